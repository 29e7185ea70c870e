"""Ray job entrypoint: `python -m jobs.train --config RUN.yaml --out RUN_DIR [--store URL] [--storage PATH|URI] [--set k=v]`.

The config is a run's config.yaml (sections dataset, data, solver, train, cluster). Inside a
submitted job Ray is joined through RAY_ADDRESS, so the address is `auto` unless --address says
otherwise (a run's own config.yaml says `local`, which a job overrides). Exit codes as the CLI's:
2 for bad input, 1 for a failed or partial run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.api import run
from engine.config import RunConfig
from engine.options import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="a run config (YAML)")
    parser.add_argument("--out", type=Path, required=True, help="run directory (shared storage on a cluster)")
    parser.add_argument("--store", help="SQLAlchemy URL of the metrics store (default sqlite in the run dir)")
    parser.add_argument("--storage", help="where workers write (a path every node mounts, or s3:// / gs://; default the run directory)")
    parser.add_argument("--address", default="auto", help="Ray address (default auto: the job's cluster)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    args = parser.parse_args(argv)
    try:
        result = run(RunConfig.resolve(args.config, args.set, address=args.address), args.out, args.store,
                     storage=args.storage)
    except DataError as error:
        print(f"jobs.train: error: {error}", file=sys.stderr)
        return 2
    print(f"run {result.run_id} -> {args.out}")
    return 0 if result.succeeded() else 1


if __name__ == "__main__":
    sys.exit(main())
