"""engine.ot.sinkhorn against POT, side by side: values and wall time.

    python benchmarks/sinkhorn.py                    # ~2 min on one CPU core
    python benchmarks/sinkhorn.py --quick            # fewer cells and repeats
    python benchmarks/sinkhorn.py --out benchmarks/out/sinkhorn.json

Two cases, each timed in turn within every repeat (medians over `--repeats`):
- `divergence`: the `sinkhorn_div_eps0.01` metric as the engine computes it
  (engine.metrics.distances.sinkhorn_divergence: eps-scaling over POT's
  `ot.sinkhorn(method="sinkhorn_log")`, float32) against a torch candidate on engine.ot.sinkhorn
  (`torch_divergence`: the same schedule, float64, the three problems stacked), on two populations
  of `--cells` cells from BCR-XL (../shared/data; 24-d CyTOF, arcsinh) when present, else Gaussian
  clouds at CyTOF scale. Reports both values and their relative difference. The candidate would
  replace the POT path only if it agreed within 1e-3 and were faster; measured (2 shared CPU
  cores, 500 cells): values within 3.1e-4, but 9x slower (its stopping rule on the potentials
  needs far more iterations at eps 0.01 than the POT path's rule on the dual value), so the
  metric keeps POT.
- `nubot_masses`: NubOT's per-step unbalanced problems (K maps, b x b, cost / max, eps 0.005,
  reg_m 0.05): one stacked torch solve against K calls of `ot.unbalanced.sinkhorn_unbalanced`
  (float64 numpy, its defaults). Reports the largest relative error of the plans.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ot
import torch

if __package__ in (None, ""):  # run as a script from a checkout: make `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import describe_device, emit  # noqa: E402
from engine.metrics.distances import sinkhorn_divergence, squared_distances  # noqa: E402
from engine.ot.sinkhorn import NUBOT_EPS, NUBOT_REG_M, sinkhorn_potentials, unbalanced_sinkhorn  # noqa: E402

BCRXL = Path(__file__).resolve().parents[2] / "shared" / "data" / "catalyst_bodenmiller_bcrxl" / "bcrxl_16samples.h5ad"


def torch_entropic_ot(cost: torch.Tensor, eps: float) -> torch.Tensor:
    """The candidate's OT_eps [K] for costs [K, n, m]: the metric's eps-scaling schedule (eps halving
    every 6 iterations from max C) over engine.ot.sinkhorn (float64), then iterations until the
    potentials move by < 1e-3 eps per iteration (at most 2000)."""
    potentials, current = None, max(float(cost.amax()), eps)
    while current > eps:
        init = None if potentials is None else (potentials.f, potentials.g)
        potentials = sinkhorn_potentials(cost, current, init=init, max_iterations=6, tol=0.0)
        current = max(current * 0.5, eps)
    init = None if potentials is None else (potentials.f, potentials.g)
    potentials = sinkhorn_potentials(cost, eps, init=init, max_iterations=2000, tol=1e-3)
    return potentials.f.mean(1) + potentials.g.mean(1)  # <a, f> + <b, g>: OT_eps at the fixed point


def torch_divergence(x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    """The candidate Sinkhorn divergence: the three problems as one stack (x and y of equal size)."""
    costs = torch.stack([0.5 * squared_distances(p, q) for p, q in ((x, y), (x, x), (y, y))])
    xy, xx, yy = torch_entropic_ot(costs.double(), eps).tolist()
    return xy - 0.5 * (xx + yy)


def populations(cells: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Two populations of `cells` cells: BCR-XL control vs stimulated when present, else Gaussians."""
    if BCRXL.exists():
        import anndata as ad

        adata = ad.read_h5ad(BCRXL)
        x = np.asarray(adata.X, np.float64)
        condition = adata.obs["condition"].astype(str).to_numpy()
        pick = lambda label: x[rng.choice(np.flatnonzero(condition == label), cells, replace=False)]  # noqa: E731
        return torch.from_numpy(pick("Ref")), torch.from_numpy(pick("BCRXL")), "bcrxl"
    x = rng.normal(size=(cells, 24)) * 1.5 + 2.0
    return torch.from_numpy(x), torch.from_numpy(rng.normal(size=(cells, 24)) * 1.5 + 2.5), "gaussian"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def divergence_case(cells: int, repeats: int, rng: np.random.Generator) -> dict[str, Any]:
    x, y, source = populations(cells, rng)
    times: dict[str, list[float]] = {"torch": [], "pot": []}
    values: dict[str, float] = {}
    for _ in range(repeats):
        values["torch"], seconds = timed(lambda: torch_divergence(x, y, 0.01))
        times["torch"].append(seconds)
        values["pot"], seconds = timed(lambda: sinkhorn_divergence(x, y, 0.01))
        times["pot"].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"data": source, "cells": cells, "dim": x.shape[1], "value": values,
            "relative_difference": abs(values["torch"] - values["pot"]) / abs(values["pot"]),
            "median_seconds": median, "speedup": median["pot"] / median["torch"]}


def masses_case(n_maps: int, batch: int, repeats: int, rng: np.random.Generator) -> dict[str, Any]:
    x = torch.from_numpy(rng.normal(size=(n_maps, batch, 2)))
    y = torch.from_numpy(rng.normal(size=(n_maps, batch, 2)) * 1.3 + 0.7)
    cost = squared_distances(x, y)
    cost = cost / cost.amax((1, 2), keepdim=True)
    uniform = np.full(batch, 1.0 / batch)
    times: dict[str, list[float]] = {"torch_stacked": [], "pot_loop": []}
    for _ in range(repeats):
        plans, seconds = timed(lambda: unbalanced_sinkhorn(cost, NUBOT_EPS, NUBOT_REG_M))
        times["torch_stacked"].append(seconds)
        reference, seconds = timed(lambda: [ot.unbalanced.sinkhorn_unbalanced(uniform, uniform, c, NUBOT_EPS,
                                                                              NUBOT_REG_M) for c in cost.numpy()])
        times["pot_loop"].append(seconds)
    error = max(float(np.linalg.norm(p.numpy() - r) / np.linalg.norm(r)) for p, r in zip(plans, reference))
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"n_maps": n_maps, "batch": batch, "max_relative_error": error, "median_seconds": median,
            "speedup": median["pot_loop"] / median["torch_stacked"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--stacks", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="500 cells, K = 4, 2 repeats")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.cells, args.stacks, args.repeats = [500], [4], 2
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    return emit({
        "benchmark": "sinkhorn",
        "device": describe_device(torch.device("cpu"), args.threads),
        "divergence": [divergence_case(n, args.repeats, rng) for n in args.cells],
        "nubot_masses": [masses_case(k, args.batch, args.repeats, rng) for k in args.stacks],
    }, args.out)


if __name__ == "__main__":
    main()
