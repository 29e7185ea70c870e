"""Evaluation of one map on held-out cells, beside its baselines.

Populations scored against the held-out perturbed cells (all in data space, optionally on the map's
marker features), following CellOT (Bunne et al. 2023): ``test`` the model's prediction from
held-out controls, ``test_identity`` the held-out controls unchanged (the upper bound on error),
``test_observed`` the training perturbed cells (the noise floor), and the closed-form maps fitted on
the training cells, applied to the same held-out controls: ``test_mean_shift`` and ``test_gaussian``
(the Bures map, which a neural map must beat to earn its place).
"""

from __future__ import annotations

import math
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

SINKHORN_EPS = 0.01
KNN_K = 50
BOOTSTRAP_METRICS = ("mmd", "l2_means")
BOOTSTRAP_SIZES = (100, 1500)
"""CellOT's bootstrap: each repeat draws a subsample size uniformly in 100..1500 cells."""

POPULATIONS = ("target_test", "test", "test_identity", "test_observed")
PURPOSES = ("sample", "knn", "bootstrap")
"""A random stream per (seed, population, purpose), seeded by the two indices in these tuples (`_rng`).
Baseline maps (`baselines` of evaluate_map) use the streams of `test`: their cells come from the same
test controls, so model and baselines are scored on the same subsamples (a paired comparison)."""


class MetricRow(NamedTuple):
    """One metric of one evaluated population (``split``: test, test_identity, test_observed, or a baseline map's)."""

    split: str
    metric: str
    value: float


def _rng(seed: int, population: str, purpose: str) -> np.random.Generator:
    """``default_rng([seed, population index, purpose index])``: independent of every other stream, so a
    population's metrics depend on (seed, its cells, the target cells) only, whatever else is computed."""
    return np.random.default_rng([seed, POPULATIONS.index(population), PURPOSES.index(purpose)])


def _subsample(n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """Sorted indices of at most ``size`` of ``n`` rows, drawn without replacement (all when n <= size)."""
    if n <= size:
        return torch.arange(n)
    return torch.from_numpy(np.sort(rng.choice(n, size, replace=False)))


def _scores(cells: torch.Tensor, target: torch.Tensor, cells_sample: torch.Tensor, target_sample: torch.Tensor,
            sinkhorn: bool) -> dict[str, float]:
    """Every unweighted metric but kNN of ``cells`` against ``target``; the O(n^2) ones on the subsamples."""
    r = float(r_means(cells, target))
    scores = {
        "mmd": float(mmd(cells_sample, target_sample, MMD_GAMMAS)),
        "mmd50": float(mmd(cells_sample, target_sample, MMD50_GAMMAS)),
        "l2_means": float(l2_means(cells, target)),
        "r_means": r,
        "r2_means": r * r,
        "energy": float(energy_distance(cells_sample, target_sample)),
    }
    if sinkhorn:
        scores[f"sinkhorn_div_eps{SINKHORN_EPS:g}"] = sinkhorn_divergence(cells_sample, target_sample, SINKHORN_EPS)
    return scores


def _knn_score(cells: torch.Tensor, target: torch.Tensor, rng: np.random.Generator) -> float:
    """kNN enrichment (k = ``KNN_K``) of random subsets of n = min(sizes) cells each, so 0.5 means mixed.

    Not computable (NaN) when n < 2k: the k neighbours then cover a large part of the union, and as k
    nears 2n - 1 the value tends to (n - 1) / (2n - 1) whatever the populations.
    """
    n = min(len(cells), len(target))
    if n < 2 * KNN_K:
        return math.nan
    pred = cells[_subsample(len(cells), n, rng)]
    obs = target[_subsample(len(target), n, rng)]
    return float(knn_enrichment(pred, obs, k=KNN_K))


def _bootstrap(
    cells: torch.Tensor, target: torch.Tensor, repeats: int, rng: np.random.Generator
) -> dict[str, float]:
    """Mean and standard deviation (ddof 1) of mmd and l2_means over ``repeats`` random subsamples."""
    values: dict[str, list[float]] = {name: [] for name in BOOTSTRAP_METRICS}
    for _ in range(repeats):
        size = int(rng.integers(BOOTSTRAP_SIZES[0], BOOTSTRAP_SIZES[1] + 1))
        cells_sample = cells[_subsample(len(cells), size, rng)]
        target_sample = target[_subsample(len(target), size, rng)]
        values["mmd"].append(float(mmd(cells_sample, target_sample, MMD_GAMMAS)))
        values["l2_means"].append(float(l2_means(cells_sample, target_sample)))
    out = {}
    for name, draws in values.items():
        out[f"{name}_boot_mean"] = float(np.mean(draws))
        out[f"{name}_boot_std"] = float(np.std(draws, ddof=1)) if repeats > 1 else 0.0
    return out


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
    knn: bool = True,
    sinkhorn: bool = True,
    max_cells: int = 2000,
    baselines: dict[str, np.ndarray] | None = None,
) -> list[MetricRow]:
    """Score a map's prediction and its baselines against the held-out perturbed cells.

    Inputs are float arrays ``[n_cells, n_features]`` in data space; ``features`` selects columns
    (the map's markers); ``baselines`` maps a split name (``test_mean_shift``, ``test_gaussian``)
    to the cells that baseline predicted from ``source_test``. Per split: ``mmd`` (6 gammas), ``mmd50`` (50 gammas), ``l2_means``,
    ``r_means`` (Pearson r of the mean vectors), ``r2_means`` (its square), ``energy``,
    ``sinkhorn_div_eps0.01`` (when ``sinkhorn``), ``knn_enrich50`` (when ``knn``; on equal-size
    subsets, 0.5 = mixed; NaN, not computable, below 2k = 100 cells per side), and ``mmd_weighted``
    (NubOT's weighted MMD: for ``test`` the predicted cells weighted by ``pred_weights`` when given;
    uniform weights, i.e. the ``mmd``, for every other split and for balanced maps, as NubOT
    reports its baselines). The means use every cell; the O(n^2)
    metrics use a seeded subsample of at most ``max_cells`` cells per population. ``bootstrap`` B > 0
    adds ``<metric>_boot_mean`` / ``_boot_std`` for mmd and l2_means over B random subsamples
    (CellOT). Deterministic: each (population, purpose) draws from its own stream of ``seed`` (`_rng`),
    so a split's values do not depend on the other splits or on the options that add metrics.
    """

    def cells_of(array: np.ndarray) -> torch.Tensor:
        array = np.asarray(array, dtype=np.float64)
        return torch.from_numpy(array if features is None else array[:, features])

    target = cells_of(target_test)
    target_sample = target[_subsample(len(target), max_cells, _rng(seed, "target_test", "sample"))]
    populations = {
        "test": cells_of(pred),
        "test_identity": cells_of(source_test),
        "test_observed": cells_of(target_train),
        **{split: cells_of(cells) for split, cells in (baselines or {}).items()},
    }
    rows: list[MetricRow] = []
    for split, cells in populations.items():
        stream = "test" if split in (baselines or {}) else split
        keep = _subsample(len(cells), max_cells, _rng(seed, stream, "sample"))
        cells_sample = cells[keep]
        scores = _scores(cells, target, cells_sample, target_sample, sinkhorn)
        if knn:
            scores[f"knn_enrich{KNN_K}"] = _knn_score(cells_sample, target_sample, _rng(seed, stream, "knn"))
        if split == "test" and pred_weights is not None:
            weights = torch.from_numpy(np.asarray(pred_weights, dtype=np.float64))[keep]
            scores["mmd_weighted"] = float(mmd(cells_sample, target_sample, MMD_GAMMAS, x_weights=weights))
        else:  # uniform weights (a balanced map, a baseline): the weighted MMD is the MMD
            scores["mmd_weighted"] = scores["mmd"]
        if bootstrap > 0:
            scores.update(_bootstrap(cells, target, bootstrap, _rng(seed, stream, "bootstrap")))
        rows += [MetricRow(split, name, value) for name, value in scores.items()]
    return rows
