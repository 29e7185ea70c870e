"""Evaluation of one map on held-out cells, beside the identity and observed baselines.

Three populations are scored against the held-out perturbed cells (all in data space, on the map's
marker features): `test` the model's prediction from held-out controls, `test_identity` the
held-out controls themselves (no change), `test_observed` the training perturbed cells (the noise floor).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from engine.metrics.distances import (
    MMD50_GAMMAS,
    MMD_GAMMAS,
    energy_distance,
    knn_enrichment,
    l2_means,
    mmd,
    r_means,
    sinkhorn_divergence,
)

SINKHORN_MAX_CELLS = 500  # POT's log-domain Sinkhorn is slow: opt-in, on a subsample
SINKHORN_EPS = 1.0  # NubOT range (1..5); eps 0.01 (CondOT, normalised data) does not converge on raw CyTOF scales
BOOTSTRAP_METRICS = ("mmd", "l2_means")


class MetricRow(NamedTuple):
    split: str
    metric: str
    value: float


def _scores(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, full: bool,
            sinkhorn: bool = False) -> dict[str, float]:
    r = float(r_means(pred, target))
    scores = {
        "mmd": float(mmd(pred, target, MMD_GAMMAS)),
        "l2_means": float(l2_means(pred, target)),
        "r_means": r,
        "r2_means": r * r,
    }
    if full:
        scores["mmd50"] = float(mmd(pred, target, MMD50_GAMMAS))
        scores["energy"] = float(energy_distance(pred, target))
        if sinkhorn:
            n = SINKHORN_MAX_CELLS
            scores[f"sinkhorn_div_eps{SINKHORN_EPS:g}"] = sinkhorn_divergence(pred[:n].numpy(), target[:n].numpy(), SINKHORN_EPS)
        n = min(len(pred), len(target))  # equal sizes, so that 0.5 means perfectly mixed
        scores["knn_enrich50"] = float(knn_enrichment(pred[:n], target[:n], 50))
        if weights is not None:
            scores["mmd_weighted"] = float(mmd(pred, target, MMD_GAMMAS, weights))
    return scores


def evaluate_map(
    pred: np.ndarray,
    target_test: np.ndarray,
    source_test: np.ndarray,
    target_train: np.ndarray,
    *,
    features: np.ndarray | None = None,
    pred_weights: np.ndarray | None = None,
    bootstrap: int = 0,
    seed: int = 0,
    max_cells: int = 2000,
    sinkhorn: bool = False,
) -> list[MetricRow]:
    """Every metric for the model and both baselines; each population capped at max_cells (seeded).

    bootstrap B > 0 adds `<metric>_boot_mean` / `_boot_std` of mmd and l2_means over B random
    subsamples of 100..1500 cells (CellOT). sinkhorn adds the (slow) Sinkhorn divergence.
    """
    rng = np.random.default_rng(seed)

    def prepare(cells: np.ndarray, weights: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        cells = np.asarray(cells, np.float32)
        if features is not None:
            cells = cells[:, features]
        keep = rng.permutation(len(cells))[:max_cells]  # random order: any prefix is a random subsample
        w = None if weights is None else torch.from_numpy(np.asarray(weights, np.float32)[keep])
        return torch.from_numpy(np.ascontiguousarray(cells[keep])), w

    target, _ = prepare(target_test)
    populations = {
        "test": prepare(pred, pred_weights),
        "test_identity": prepare(source_test),
        "test_observed": prepare(target_train),
    }
    rows = []
    for split, (cells, weights) in populations.items():
        rows += [MetricRow(split, name, value) for name, value in _scores(cells, target, weights, full=True, sinkhorn=sinkhorn).items()]
        for name, values in _bootstrap(cells, target, bootstrap, rng).items():
            rows += [MetricRow(split, f"{name}_boot_mean", float(np.mean(values))),
                     MetricRow(split, f"{name}_boot_std", float(np.std(values)))]
    return rows


def _bootstrap(cells: torch.Tensor, target: torch.Tensor, repeats: int, rng: np.random.Generator) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in BOOTSTRAP_METRICS} if repeats else {}
    for _ in range(repeats):
        size = int(rng.integers(100, 1501))
        a = torch.from_numpy(rng.choice(len(cells), min(size, len(cells)), replace=False))
        b = torch.from_numpy(rng.choice(len(target), min(size, len(target)), replace=False))
        scores = _scores(cells[a], target[b], None, full=False)
        for name in BOOTSTRAP_METRICS:
            out[name].append(scores[name])
    return out
