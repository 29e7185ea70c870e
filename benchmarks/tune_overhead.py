"""Per-trial overhead of a search (`perturbot tune`) with Tune's actor reuse on and off, side by side.

    python benchmarks/tune_overhead.py [--trials 9] [--repeats 2] [--out FILE.json]

Trials that train almost nothing (1 step on 2 synthetic maps of dimension 5, tiny networks) run one
at a time (FIFO, --max-concurrent 1), so a search's time is set-up plus trials x (the trial's own
overhead: starting or resetting its actor, fetching the cells from the object store, building the
stack and the solver, the first evaluation, i.e. start to first training step). The per-trial
overhead is the slope between a search of 1 trial and one of --trials trials (fixed costs such as
data preparation and Tune's start-up cancel out), measured for reuse_actors on and off alternately
in each repeat; medians over repeats. Needs Ray (a local one is started: 2 CPUs).
"""
from __future__ import annotations

import argparse
import contextlib
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


def search_seconds(config: RunConfig, trials: int, reuse: bool, root: Path) -> float:
    """Wall time of a whole search (data preparation to best.yaml) of `trials` one-at-a-time trials."""
    settings = SearchSettings(space=SPACE, samples=trials, scheduler="fifo", max_concurrent=1, reuse_actors=reuse)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Tune's messages; stdout carries the JSON only
        start(config, settings, root / f"search-{trials}-{reuse}-{time.time_ns()}")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=9, help="trials of the larger search (default 9)")
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
                one = search_seconds(config, 1, reuse, root)
                many = search_seconds(config, args.trials, reuse, root)
                samples[reuse].append((many - one) / (args.trials - 1))
                log(f"repeat {repeat}: reuse_actors={reuse}: 1 trial {one:.1f} s, {args.trials} trials {many:.1f} s, "
                    f"{samples[reuse][-1]:.2f} s per trial")
    on, off = statistics.median(samples[True]), statistics.median(samples[False])
    doc = {
        "benchmark": "tune_overhead",
        "config": {"trials": args.trials, "repeats": args.repeats, "steps_per_trial": 1, "maps": 2, "dim": 5,
                   "concurrency": 1, "scheduler": "fifo", "statistic": "median over repeats of (T(trials) - T(1)) / (trials - 1)"},
        "per_trial_seconds": {"reuse_actors_on": on, "reuse_actors_off": off},
        "ratio_off_to_on": off / on,
        "samples": {"reuse_actors_on": samples[True], "reuse_actors_off": samples[False]},
    }
    return emit(doc, args.out)


if __name__ == "__main__":
    main()
