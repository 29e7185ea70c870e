"""Distances between cell populations and the evaluation of maps against baselines."""
from engine.metrics.distances import MMD50_GAMMAS, MMD_GAMMAS, energy_distance, knn_enrichment, l2_means, mmd, r_means, sinkhorn_divergence
from engine.metrics.evaluate import MetricRow, evaluate_map

__all__ = ["MMD50_GAMMAS", "MMD_GAMMAS", "MetricRow", "energy_distance", "evaluate_map", "knn_enrichment",
           "l2_means", "mmd", "r_means", "sinkhorn_divergence"]
