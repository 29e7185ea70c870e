"""Marker features of a map: the features that differ most between perturbed and control cells."""

from __future__ import annotations

import numpy as np


def welch_t(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Welch's t per column (Welch 1947): (mean_a - mean_b) / sqrt(s_a^2 / n_a + s_b^2 / n_b).

    Unbiased variances s^2; a zero denominator counts as 1e-12 (constant features with equal means
    give 0, different means a very large t).
    """
    n_a, n_b = len(a), len(b)
    var_a = a.var(axis=0, dtype=np.float64) * n_a / max(n_a - 1, 1)
    var_b = b.var(axis=0, dtype=np.float64) * n_b / max(n_b - 1, 1)
    diff = a.mean(axis=0, dtype=np.float64) - b.mean(axis=0, dtype=np.float64)
    return diff / np.maximum(np.sqrt(var_a / n_a + var_b / n_b), 1e-12)


def rank_markers(perturbed: np.ndarray, control: np.ndarray, n: int) -> np.ndarray:
    """Indices (int64) of the top-n features by |Welch t|, most different first (all when d <= n)."""
    return np.argsort(-np.abs(welch_t(perturbed, control)), kind="stable")[:n].astype(np.int64)
