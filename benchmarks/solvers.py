"""Per-iteration speed of the solvers side by side: map-steps/s of each solver in each training phase.

    python benchmarks/solvers.py                     # d = 48 1000, K = 1 8 (~5 min on one CPU core)
    python benchmarks/solvers.py --quick             # d = 48, K = 1, few steps
    python benchmarks/solvers.py --device cuda --stacks 1 8 64 --out benchmarks/out/solvers_gpu.json

Cases: `cellot` (the engine's defaults: amortised dual), `cellot_published` (CellOT's min-max loop:
10 g-steps per outer step), `w1ot` in each of its phases (`w1ot:potential`, `w1ot:step_size`) and
`nubot` (two unbalanced Sinkhorn solves per step besides its ICNN pair).
For each (d, K) every case trains the same synthetic Gaussian maps (benchmarks/throughput.py); after
warm-up steps the cases are timed in turn within each repeat (side by side), and the median
map-steps/s (K x outer steps / s of `solver.train_step`) is reported with its ratio to each CellOT
loop. The W1OT paper claims 2.5-4.5x per iteration over the W2 solver.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script from a checkout: make `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import describe_device, emit  # noqa: E402
from benchmarks.throughput import BATCH_SIZE, Runner, synthetic_maps  # noqa: E402
from engine.solvers import build_solver  # noqa: E402
from engine.solvers.cellot import CellOT  # noqa: E402
from engine.train.device import resolve_device  # noqa: E402
from engine.train.stack_data import StackData, map_seed  # noqa: E402

CASES: dict[str, tuple[str, dict[str, Any], str | None]] = {  # name: (solver, options, phase)
    "cellot": ("cellot", {}, None),
    "cellot_published": ("cellot", dict(CellOT.published), None),
    "w1ot:potential": ("w1ot", {}, "potential"),
    "w1ot:step_size": ("w1ot", {}, "step_size"),
    "nubot": ("nubot", {}, None),
}


def runner(case: str, dim: int, n_maps: int, device: torch.device) -> Runner:
    solver_name, options, phase = CASES[case]
    pops = synthetic_maps(n_maps, dim, seed=dim * 1000 + n_maps)
    seeds = [map_seed(0, f"m{k}") for k in range(n_maps)]
    data = StackData(*pops, seeds=seeds, batch_size=BATCH_SIZE, device=device)
    solver = build_solver(solver_name, n_maps, dim, options)
    solver.initialize(data, seeds)
    solver.to(device)
    solver.start_training(solver.plan(solver.config, 10**9))
    return Runner(data, solver, device, phase)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[48, 1000])
    parser.add_argument("--stacks", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seconds", type=float, default=3.0, help="target timed seconds per case and repeat (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed outer steps per case")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: per-core numbers)")
    parser.add_argument("--quick", action="store_true", help="d = 48, K = 1, 1 s per case, 2 repeats")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.dims, args.stacks, args.seconds, args.repeats = [48], [1], 1.0, 2
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    started = time.perf_counter()
    results = []
    for dim in args.dims:
        for n_maps in args.stacks:
            runners = {case: runner(case, dim, n_maps, device) for case in args.cases}
            steps = {}
            for case, run in runners.items():  # warm up, then size each case's steps to ~args.seconds
                run.run(args.warmup)
                steps[case] = max(1, round(args.seconds / max(run.run(1), 1e-6)))
            rates: dict[str, list[float]] = {case: [] for case in runners}
            for _ in range(args.repeats):
                for case, run in runners.items():
                    rates[case].append(n_maps * steps[case] / run.run(steps[case]))
            medians = {case: statistics.median(values) for case, values in rates.items()}
            row = {"dim": dim, "n_maps": n_maps, "steps_per_repeat": steps, "map_steps_per_s": medians, "samples": rates}
            for reference in ("cellot", "cellot_published"):
                if reference in medians:
                    row[f"ratio_to_{reference}"] = {case: value / medians[reference] for case, value in medians.items()}
            results.append(row)
            print(f"d={dim} K={n_maps}: " + ", ".join(f"{c} {v:.1f}" for c, v in medians.items()) + " map-steps/s",
                  file=sys.stderr)
    report = {
        "benchmark": "solvers",
        "config": {"cases": {c: CASES[c][:2] + (CASES[c][2] or "train",) for c in args.cases}, "batch_size": BATCH_SIZE,
                   "timed": "solver.train_step (on-device sampling + the step); median over repeats, cases in turn",
                   **{k: v for k, v in vars(args).items() if k != "out"}},
        "device": describe_device(device, torch.get_num_threads()),
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
