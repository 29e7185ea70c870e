"""Per-trial overhead of a search (`perturbot tune`) with Tune's actor reuse on and off, side by side.

    python benchmarks/tune_overhead.py [--trials 8] [--repeats 2] [--out FILE.json]

Trials that train almost nothing (1 step on 2 synthetic maps of dimension 5, ICNNs 2 x 8) run one
at a time (FIFO, --max-concurrent 1), so the time from the first trial's start to the last trial's
last report is trials x the per-trial overhead: starting (or, with reuse, resetting) the trial's
actor, fetching the cells from the object store, building the stack and the solver and evaluating
it once, i.e. start to first training step (plus one tiny step and evaluation). Both ends are read
from Tune's saved trial metadata (start_time, last_result_time: the driver's clock), so Tune's own
start-up and the data preparation are not counted. reuse_actors on and off alternate in every
repeat; medians over repeats. Needs Ray (a local one is started: 2 CPUs).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import emit  # noqa: E402
from engine.cluster.runtime import connect  # noqa: E402
from engine.config import RunConfig  # noqa: E402
from engine.data import make_synthetic  # noqa: E402
from tune.search import SearchSettings, start  # noqa: E402

SPACE = {"solver.lr": {"loguniform": [1.0e-4, 1.0e-2]}, "solver.hidden": {"layers": {"width": [8], "depth": [2]}}}


def per_trial_seconds(config: RunConfig, trials: int, reuse: bool, root: Path) -> float:
    """(last trial's last report - first trial's start) / trials, from Tune's saved trial metadata."""
    settings = SearchSettings(space=SPACE, samples=trials, scheduler="fifo", max_concurrent=1, reuse_actors=reuse)
    with contextlib.redirect_stdout(sys.stderr):  # Tune's messages; stdout carries the JSON only
        result = start(config, settings, root / f"search-{reuse}-{time.time_ns()}")
    state = (result.dir.ray_storage / result.run_id).glob("experiment_state-*.json")[-1]  # sorted by name
    metadata = [json.loads(m) if isinstance(m, str) else m for _, m in json.loads(state.read_text())["trial_data"]]
    return (max(m["last_result_time"] for m in metadata) - min(m["start_time"] for m in metadata)) / trials


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8, help="trials per search (default 8)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    connect("local", num_cpus=2)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    samples: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "cells.h5ad"
        make_synthetic(n_perturbations=1, n_groups=2, dim=5, n_cells=120, seed=0).write_h5ad(data)
        config = RunConfig.resolve(None, ["train.eval_every=1", "solver.conjugate_steps=1"], dataset=str(data),
                                   condition_key="condition", control="control", split_by="group", steps=1)
        for repeat in range(args.repeats):
            for reuse in (True, False):
                samples[reuse].append(per_trial_seconds(config, args.trials, reuse, root))
                log(f"repeat {repeat}: reuse_actors={reuse}: {samples[reuse][-1]:.2f} s per trial")
    on, off = statistics.median(samples[True]), statistics.median(samples[False])
    doc = {
        "benchmark": "tune_overhead",
        "config": {"trials": args.trials, "repeats": args.repeats, "steps_per_trial": 1, "maps": 2, "dim": 5,
                   "concurrency": 1, "scheduler": "fifo",
                   "statistic": "median over repeats of (last trial's last report - first trial's start) / trials"},
        "per_trial_seconds": {"reuse_actors_on": on, "reuse_actors_off": off},
        "ratio_off_to_on": off / on,
        "samples": {"reuse_actors_on": samples[True], "reuse_actors_off": samples[False]},
    }
    return emit(doc, args.out)


if __name__ == "__main__":
    main()
