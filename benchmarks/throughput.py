"""Training throughput of the stack of maps: K maps trained as one network vs one at a time.

    python benchmarks/throughput.py [--dims 24 50] [--stacks 1 8 32 128] [--steps N]
                                    [--device cpu|cuda] [--threads T] [--out FILE.json] [--quick]

For each dimension d and stack size K, on synthetic Gaussian data, with CellOT's `--loop` (default:
the engine's defaults, amortised-conjugate dual with 10 conjugate steps per outer step; published:
CellOT's min-max, 10 inner g-steps per outer step) and batch 256:
  - stacked:          one K-map solver, K * outer steps / s;
  - one_at_a_time:    K separate K=1 solvers, each trained the same number of outer steps, one after
                      the other, K * outer steps / total s (for K > --subset, --subset of them are
                      timed and the time is scaled by K / subset);
  - ratio:            stacked / one_at_a_time.
Both are timed side by side in this process (alternating, each after its own warm-up steps), and the
medians over --repeats repeats are reported. A single map at d=48 is also timed with both loops and
compared with the authors' CellOT code (a constant measured by the project lead on one core of this
project's machine; their loop is the published one, so that ratio compares like with like).

Only torch, numpy and the training core are imported (no Ray), so it runs on a bare GPU box.
Prints one JSON document; `main(argv)` returns it as a dict.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script from a checkout: make `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import describe_device, emit  # noqa: E402
from engine.solvers import build_solver  # noqa: E402
from engine.solvers.cellot import CellOT  # noqa: E402
from engine.solvers.base import StackSolver  # noqa: E402
from engine.options import DataError  # noqa: E402
from engine.train.device import resolve_device  # noqa: E402
from engine.train.stack_data import StackData, map_seed  # noqa: E402

SOLVER = "cellot"
LOOPS: dict[str, dict[str, Any]] = {"default": {}, "published": dict(CellOT.published)}
BATCH_SIZE = 256
TRAIN_CELLS, VALID_CELLS = 2000, 100  # per map and population (validation cells are not used here)
REFERENCE = {
    "dim": 48,
    "outer_steps_per_s": 24.7,
    "code": "the authors' CellOT implementation",
    "hardware": "one CPU core of this project's machine",
    "note": "measured by the project lead, not by this script; compare only with a CPU run at --threads 1",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[24, 50], help="feature dimensions d (default: 24 50)")
    p.add_argument("--stacks", type=int, nargs="+", default=[1, 8, 32, 128], help="stack sizes K (default: 1 8 32 128)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed outer steps per repeat, for the stack and for each single map alike "
        "(default: max(3, ceil(32 / K)), so small stacks are timed over enough steps; --quick: 2)",
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed outer steps before timing (default 2; --quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, the median is reported (default 3)")
    p.add_argument("--subset", type=int, default=8, help="one-at-a-time: time at most this many maps, scale to K (default 8)")
    p.add_argument("--reference-steps", type=int, default=None, help="timed outer steps of the d=48 single map per repeat (default 25; --quick 10)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: per-core numbers)")
    p.add_argument("--loop", choices=sorted(LOOPS), default="default",
                   help="CellOT settings: default (amortised dual) or published (CellOT's min-max)")
    p.add_argument("--quick", action="store_true", help="~30 s smoke run: d=24, K in 1 8, few steps")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    given = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(given)
    if args.quick:  # smaller defaults; explicit --dims / --stacks still win
        named = {a.split("=")[0] for a in given}
        if "--dims" not in named:
            args.dims = [24]
        if "--stacks" not in named:
            args.stacks = [1, 8]
    defaults = {"warmup": (1, 2), "repeats": (3, 3), "reference_steps": (10, 25)}
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.quick and args.steps is None:
        args.steps = 2
    return args


def synthetic_maps(n_maps: int, dim: int, seed: int) -> tuple[list[np.ndarray], ...]:
    """Per map: Gaussian controls and a shifted, rescaled Gaussian response (float32 [n, d])."""
    rng = np.random.default_rng(seed)
    pops: tuple[list[np.ndarray], ...] = ([], [], [], [])
    for _ in range(n_maps):
        mean, shift, scale = rng.normal(size=dim), rng.normal(size=dim), rng.uniform(0.5, 1.5, size=dim)
        for i, n in enumerate((TRAIN_CELLS, TRAIN_CELLS, VALID_CELLS, VALID_CELLS)):
            x = rng.normal(size=(n, dim)) + mean
            pops[i].append((x * scale + shift if i % 2 else x).astype(np.float32))
    return pops


def build(pops: tuple[list[np.ndarray], ...], maps: list[int], device: torch.device, tag: str,
          loop: str) -> tuple[StackData, StackSolver]:
    """A CellOT solver with the settings of `loop` (LOOPS) for `maps`, on `device`."""
    seeds = [map_seed(0, f"{tag}{k}") for k in maps]
    data = StackData(*([pop[k] for k in maps] for pop in pops), seeds=seeds, batch_size=BATCH_SIZE, device=device)
    solver = build_solver(SOLVER, len(maps), data.dim, LOOPS[loop])
    solver.initialize(data, seeds)
    solver.to(device)
    solver.start_training(solver.plan(solver.config, 10**9))
    return data, solver


class Runner:
    """Outer steps of one solver in one phase of its plan (default: the first), with a clock that
    waits for the device."""

    def __init__(self, data: StackData, solver: StackSolver, device: torch.device, phase: str | None = None) -> None:
        self.data, self.solver, self.device, self.step = data, solver, device, 0
        phases = solver.plan(solver.config, 10**9).phases
        self.phase = phases[0] if phase is None else next(p for p in phases if p.name == phase)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, steps: int) -> float:
        """Seconds for `steps` outer steps (train_step: sampling + the solver step; no evaluation)."""
        self.sync()
        started = time.perf_counter()
        for _ in range(steps):
            self.solver.train_step(self.data, self.step, self.phase)
            self.step += 1
        self.sync()
        return time.perf_counter() - started


def steps_for(n_maps: int, args: argparse.Namespace) -> int:
    return args.steps if args.steps is not None else max(3, math.ceil(32 / n_maps))


def measure_pair(dim: int, n_maps: int, args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    """Stacked vs one-at-a-time map-steps/s for K = n_maps at dimension dim."""
    steps = steps_for(n_maps, args)
    pops = synthetic_maps(n_maps, dim, seed=dim * 1000 + n_maps)
    stacked = Runner(*build(pops, list(range(n_maps)), device, "m", args.loop), device)
    timed = list(range(min(n_maps, args.subset)))
    singles = [Runner(*build(pops, [k], device, "m", args.loop), device) for k in timed]
    stacked.run(args.warmup)
    for single in singles:
        single.run(args.warmup)
    stacked_rates, single_rates = [], []
    for _ in range(args.repeats):  # side by side: alternate the two ways in every repeat
        seconds = stacked.run(steps)
        stacked_rates.append(n_maps * steps / seconds)
        seconds = sum(single.run(steps) for single in singles) * n_maps / len(timed)
        single_rates.append(n_maps * steps / seconds)
    row = {
        "dim": dim,
        "n_maps": n_maps,
        "steps_per_repeat": steps,
        "stacked_map_steps_per_s": statistics.median(stacked_rates),
        "one_at_a_time_map_steps_per_s": statistics.median(single_rates),
        "one_at_a_time_maps_timed": len(timed),
        "one_at_a_time_scaled": len(timed) < n_maps,
        "stacked_samples": stacked_rates,
        "one_at_a_time_samples": single_rates,
    }
    row["ratio"] = row["stacked_map_steps_per_s"] / row["one_at_a_time_map_steps_per_s"]
    row["stacked_outer_steps_per_s"] = row["stacked_map_steps_per_s"] / n_maps
    log(
        f"d={dim:<4} K={n_maps:<4} stacked {row['stacked_map_steps_per_s']:9.1f} map-steps/s   one at a time "
        f"{row['one_at_a_time_map_steps_per_s']:8.1f}{' (scaled from %d maps)' % len(timed) if row['one_at_a_time_scaled'] else ''}"
        f"   ratio {row['ratio']:.2f}"
    )
    return row


def measure_reference(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Outer steps/s of one map at the reference dimension, per loop (medians; timed side by side)."""
    dim = REFERENCE["dim"]
    runners = {loop: Runner(*build(synthetic_maps(1, dim, seed=dim), [0], device, "ref", loop), device) for loop in LOOPS}
    rates: dict[str, list[float]] = {loop: [] for loop in LOOPS}
    for runner in runners.values():
        runner.run(args.warmup)
    for _ in range(args.repeats):
        for loop, runner in runners.items():
            rates[loop].append(args.reference_steps / runner.run(args.reference_steps))
    return {loop: statistics.median(values) for loop, values in rates.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print and return the JSON document (a dict)."""
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except DataError as error:
        raise SystemExit(f"throughput: {error}") from error
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731 (progress; JSON goes to stdout)
    started = time.perf_counter()
    try:
        results = [measure_pair(dim, n_maps, args, device, log) for dim in args.dims for n_maps in args.stacks]
        single = measure_reference(args, device)
    finally:
        torch.set_num_threads(threads_before)
    comparable = device.type == "cpu" and args.threads == 1
    doc = {
        "benchmark": "throughput",
        "solver": SOLVER,
        "config": {
            "loop": args.loop,
            "solver": str(build_solver(SOLVER, 1, 2, LOOPS[args.loop]).config),
            "batch_size": BATCH_SIZE,
            "train_cells_per_map": TRAIN_CELLS,
            "timed": "solver.train_step (on-device sampling; default: 11 conjugate evaluations + 1 g-step + 1 f-step; "
                     "published: 10 g-steps + 1 f-step); no evaluation, checkpoints or loop bookkeeping",
            "warmup_steps": args.warmup,
            "steps_per_repeat": args.steps if args.steps is not None else "max(3, ceil(32 / K)), per result row",
            "repeats": args.repeats,
            "statistic": "median over repeats",
            "one_at_a_time": f"K separate K=1 solvers, each the same number of outer steps; for K > {args.subset} the first "
            f"{args.subset} maps are timed and the time is scaled by K / {args.subset}",
            "quick": args.quick,
        },
        "device": describe_device(device, args.threads),
        "results": results,
        "single_map": {
            "dim": REFERENCE["dim"],
            "outer_steps_per_s": single,
            "reference": REFERENCE,
            "ratio_to_reference": {loop: rate / REFERENCE["outer_steps_per_s"] for loop, rate in single.items()},
            "comparable_to_reference": comparable,
        },
        "seconds": time.perf_counter() - started,
    }
    return emit(doc, args.out)


if __name__ == "__main__":
    main()
