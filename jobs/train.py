"""Ray job entrypoint: `python -m jobs.train --config RUN.yaml --out RUN_DIR [--store URL]`.

Inside a submitted job Ray is joined through RAY_ADDRESS (cluster.address defaults to `auto` here).
The config is a run's config.yaml (sections dataset, data, solver, train, cluster).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from engine.api import run
from engine.config import RunConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--store")
    args = parser.parse_args(argv)
    raw = yaml.safe_load(args.config.read_text())
    raw.setdefault("cluster", {}).setdefault("address", "auto")
    result = run(RunConfig.from_dict(raw), args.out, args.store)
    print(f"run {result.run_id} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
