"""Ground truth: W2 solvers against known maps far from affine, as curves over steps and wall time.

Each problem (engine.data.synthetic.KnownMaps) is a 4-cluster Gaussian mixture in d dimensions pushed
through K known gradients of convex potentials. Every `--every` steps the benchmark scores each map
on fresh source cells: L2-UVP = 100 E||T_hat(x) - T*(x)||^2 / tr Cov(target) and the cosine between
T_hat(x) - x and T*(x) - x (Korotin et al. 2021), beside the closed-form Bures map fitted on the same
training cells. The clock counts training steps only (not the scoring).

    python benchmarks/ground_truth.py                       # d = 2 8 32 64, 3 maps, default vs published loop
    python benchmarks/ground_truth.py --quick               # d = 8, 300 steps
    python benchmarks/ground_truth.py --dims 8 --steps 6000 --variants default --out benchmarks/out/gt.json

Variants: `default` (CellOT's defaults: amortised-conjugate dual, Bures start, cosine lr 3e-3),
`published` (CellOT's published loop: min-max, uniform init, lr 1e-4) and `minmax_bures` (the min-max
from the Bures start at lr 1e-4, the engine's default before the amortised dual).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

if __package__ in (None, ""):  # run as a script from a checkout: make `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import describe_device, emit  # noqa: E402
from engine.data.synthetic import make_known_maps  # noqa: E402
from engine.metrics.distances import cosine, l2_uvp  # noqa: E402
from engine.solvers import build_solver  # noqa: E402
from engine.solvers.baselines import GaussianMap  # noqa: E402
from engine.solvers.cellot import CellOT  # noqa: E402
from engine.train.device import resolve_device  # noqa: E402
from engine.train.stack_data import StackData, map_seed  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "published": dict(CellOT.published),
    "minmax_bures": {"dual": "minmax", "lr": 1e-4, "lr_schedule": "constant"},
}


class Problem:
    """Training cells (StackData), fresh source cells and their true images for K known maps."""

    def __init__(self, dim: int, n_maps: int, cells: int, seed: int, strength: float, device: torch.device) -> None:
        maps = make_known_maps(dim, n_maps, strength=strength, seed=seed)
        rng = np.random.default_rng(seed + 1)
        source = [maps.sample_source(cells, rng) for _ in range(n_maps)]
        target = [maps.transport(k, maps.sample_source(cells, rng)) for k in range(n_maps)]
        valid = [maps.sample_source(500, rng) for _ in range(n_maps)]
        valid_target = [maps.transport(k, maps.sample_source(500, rng)) for k in range(n_maps)]
        self.seeds = [map_seed(seed, f"known{k}") for k in range(n_maps)]
        self.data = StackData(source, target, valid, valid_target, seeds=self.seeds, batch_size=256, device=device)
        fresh = maps.sample_source(4000, rng)
        self.fresh = torch.from_numpy(np.stack([fresh] * n_maps)).to(device)
        self.truth = torch.from_numpy(np.stack([maps.transport(k, fresh) for k in range(n_maps)])).to(device)
        self.trace = [float(np.trace(np.cov(t.T))) for t in target]

    def score(self, moved: torch.Tensor) -> dict[str, list[float]]:
        """Per-map L2-UVP (%) and cosine of predicted images `moved` [K, n, d] of the fresh cells."""
        return {
            "l2_uvp": [float(l2_uvp(moved[k], self.truth[k], self.trace[k])) for k in range(len(self.trace))],
            "cosine": [float(cosine(moved[k] - self.fresh[k], self.truth[k] - self.fresh[k])) for k in range(len(self.trace))],
        }

    def bures(self) -> dict[str, list[float]]:
        baseline = GaussianMap(len(self.seeds), self.data.dim, GaussianMap.Config())
        baseline.initialize(self.data, [])
        return self.score(baseline.to(self.data.device).transport(self.fresh).cells)


def train_curve(problem: Problem, params: dict[str, Any], steps: int, every: int) -> list[dict[str, Any]]:
    """Train a CellOT stack for `steps` outer steps; score it at step 0, every `every` steps and at the end."""
    data = problem.data
    data.draws = 0  # every variant sees the same minibatches
    solver = build_solver("cellot", data.n_maps, data.dim, params)
    solver.initialize(data, problem.seeds)
    solver.to(data.device)
    plan = solver.plan(solver.config, steps)
    solver.start_training(plan)
    seconds = 0.0
    curve = [{"step": 0, "seconds": 0.0, **problem.score(solver.transport(problem.fresh).cells)}]
    for phase, begin, end in plan.spans():
        for step in range(begin, end):
            started = time.perf_counter()
            solver.train_step(data, step, phase)
            if data.device.type == "cuda":
                torch.cuda.synchronize(data.device)
            seconds += time.perf_counter() - started
            if (step + 1) % every == 0 or step + 1 == plan.total:
                curve.append({"step": step + 1, "seconds": round(seconds, 2), **problem.score(solver.transport(problem.fresh).cells)})
                print(f"  step {step + 1}: {seconds:.0f}s, L2-UVP {[round(v, 2) for v in curve[-1]['l2_uvp']]}", file=sys.stderr)
    return curve


def first_reaching(curve: list[dict[str, Any]], levels: list[float]) -> dict[str, Any] | None:
    """The first scored point where every map's L2-UVP is at or below its level (None if never)."""
    for point in curve:
        if all(v <= level for v, level in zip(point["l2_uvp"], levels)):
            return {"step": point["step"], "seconds": point["seconds"]}
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32, 64])
    parser.add_argument("--maps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000, help="outer steps per variant (default 2000, the default budget)")
    parser.add_argument("--every", type=int, default=250, help="score every N steps")
    parser.add_argument("--variants", nargs="+", default=["default", "published"], choices=sorted(VARIANTS))
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="solver options on top of every variant (values parsed as YAML), e.g. lr=3e-4")
    parser.add_argument("--strength", type=float, default=6.0, help="a in KnownMaps (how far from affine)")
    parser.add_argument("--cells", type=int, default=4000, help="training cells per map and population")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="smoke run: d = 8, 300 steps, scored every 100")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.dims, args.steps, args.every = [8], 300, 100
    overrides = {}
    for assignment in args.overrides:
        key, sep, value = assignment.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {assignment!r}")
        overrides[key] = yaml.safe_load(value)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    started = time.perf_counter()
    results = []
    for dim in args.dims:
        problem = Problem(dim, args.maps, args.cells, args.seed, args.strength, device)
        bures = problem.bures()
        print(f"d={dim}: Bures L2-UVP {[round(v, 2) for v in bures['l2_uvp']]}", file=sys.stderr)
        entry: dict[str, Any] = {"dim": dim, "bures": bures, "variants": {}}
        for name in args.variants:
            print(f" {name}", file=sys.stderr)
            params = {**VARIANTS[name], **overrides}
            curve = train_curve(problem, params, args.steps, args.every)
            final = curve[-1]["l2_uvp"]
            entry["variants"][name] = {
                "params": params,
                "final_l2_uvp": final,
                "final_over_bures": [f / b for f, b in zip(final, bures["l2_uvp"])],
                "half_bures_at": first_reaching(curve, [b / 2 for b in bures["l2_uvp"]]),
                "one_percent_at": first_reaching(curve, [1.0] * args.maps),
                "map_steps_per_s": args.maps * curve[-1]["step"] / max(curve[-1]["seconds"], 1e-9),
                "curve": curve,
            }
        results.append(entry)
    report = {
        "benchmark": "ground_truth",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": describe_device(device, torch.get_num_threads()),
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
