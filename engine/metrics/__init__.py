"""Distances between cell populations and the evaluation of maps against baselines (SOLVERS.md)."""

from engine.metrics.distances import (
    MMD50_GAMMAS,
    MMD_GAMMAS,
    cosine,
    energy_distance,
    knn_enrichment,
    l2_means,
    l2_uvp,
    mmd,
    r_means,
    sinkhorn_divergence,
    squared_distances,
)
from engine.metrics.evaluate import MetricRow, evaluate_map

__all__ = [
    "MMD50_GAMMAS",
    "MMD_GAMMAS",
    "MetricRow",
    "cosine",
    "energy_distance",
    "evaluate_map",
    "knn_enrichment",
    "l2_means",
    "l2_uvp",
    "mmd",
    "r_means",
    "sinkhorn_divergence",
    "squared_distances",
]
