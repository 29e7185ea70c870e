"""Data-layer timings: the synthetic generator and prepare() on the BCR-XL data.

    python benchmarks/data_prep.py [--repeats N] [--data FILE.h5ad] [--out FILE.json] [--quick]

  - make_synthetic:  seconds of make_synthetic() with its defaults (2 groups x 4 conditions x 500 cells,
                     8 features), median of --repeats calls;
  - prepare_bcrxl:   seconds of prepare() on the BCR-XL CyTOF data (../shared/data beside the repo),
                     one map per donor (DataSpec("condition", "Ref", split_by="patient_id"), default
                     train/valid/test split), median of --repeats calls; reading the h5ad is timed once,
                     apart. Skipped, with a `reason`, when the file is absent.
Each entry also gives `former_test_limit_s`, the bound the unit tests used to assert (moved here: a
timing on a shared machine is not a unit test).

Only numpy, anndata and engine.data are imported (no torch, no Ray). Prints one JSON document;
`main(argv)` returns it as a dict.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script from a checkout: make `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import emit  # noqa: E402
from engine.data import DataSpec, make_synthetic, prepare, read_h5ad  # noqa: E402

BCRXL = Path(__file__).resolve().parents[2] / "shared" / "data" / "catalyst_bodenmiller_bcrxl" / "bcrxl_16samples.h5ad"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per entry, the median is reported (default 7; --quick 3)")
    p.add_argument("--data", type=Path, default=BCRXL, help=f"the BCR-XL h5ad (default {BCRXL})")
    p.add_argument("--quick", action="store_true", help="a few seconds: 3 repeats")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def timed(call: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Seconds of each of `repeats` calls, and the last call's result."""
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - started)
    return seconds, result


def measure_synthetic(repeats: int) -> dict[str, Any]:
    seconds, adata = timed(make_synthetic, repeats)
    return {"seconds": statistics.median(seconds), "samples": seconds, "shape": list(adata.shape), "former_test_limit_s": 1.0}


def measure_bcrxl(path: Path, repeats: int) -> dict[str, Any]:
    if not path.is_file():
        return {"skipped": True, "reason": f"real data not available: {path} (../shared/data beside the repo)"}
    started = time.perf_counter()
    adata = read_h5ad(path)
    read_seconds = time.perf_counter() - started
    spec = DataSpec("condition", "Ref", split_by="patient_id")
    seconds, prepared = timed(lambda: prepare(adata, spec), repeats)
    return {
        "skipped": False,
        "path": str(path),
        "seconds": statistics.median(seconds),
        "samples": seconds,
        "read_seconds": read_seconds,
        "n_cells": adata.n_obs,
        "n_features": adata.n_vars,
        "n_maps": len(prepared.maps),
        "n_tables": len(prepared.tables),
        "spec": spec.to_dict(),
        "former_test_limit_s": 2.0,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731 (progress; JSON goes to stdout)
    started = time.perf_counter()
    synthetic = measure_synthetic(args.repeats)
    log(f"make_synthetic  {synthetic['seconds']:.3f} s (median of {args.repeats})")
    bcrxl = measure_bcrxl(args.data, args.repeats)
    log(f"prepare BCR-XL  {bcrxl['reason']}" if bcrxl["skipped"] else f"prepare BCR-XL  {bcrxl['seconds']:.3f} s (median of {args.repeats})")
    doc = {
        "config": {"repeats": args.repeats, "statistic": "median", "quick": args.quick},
        "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()},
        "make_synthetic": synthetic,
        "prepare_bcrxl": bcrxl,
        "seconds": time.perf_counter() - started,
    }
    return emit(doc, args.out)


if __name__ == "__main__":
    main()
