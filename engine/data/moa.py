"""Mode-of-action embeddings (CondOT, Bunne et al. 2022, Sec. 3.2 and App. E.3.1): perturbations with
similar effects get nearby context vectors.

The distance between two perturbations is the W2 distance between Gaussian fits of their target
(perturbed) populations, in closed form (engine.ot.gaussian.gaussian_w2; the paper uses W2 between the
populations themselves: the Gaussian fit keeps it deterministic and costs O(J^2 d^3) for J
perturbations, not J^2 OT problems). The points are a metric MDS of these distances: stress
sum_{i<j} (delta_ij - |x_i - x_j|)^2 minimised by SMACOF (De Leeuw 1977; Guttman transforms from the
classical-MDS start), in min(10, J - 1) dimensions, then divided by their largest |coordinate|.

Only the training cells of seen perturbations enter the MDS. A perturbation with no training cells
(a held-out context) is placed afterwards, with the seen points fixed, from the W2 distances between
its own observed cells and the seen populations (the paper assumes "marginal sample access to all
individual perturbations"): its context summarises the population it is evaluated on, by its
distances to the seen ones.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.ot.gaussian import COVARIANCE_RIDGE, gaussian_moments, gaussian_w2

MOA_DIMS = 10  # the paper's MDS dimension
ITERATIONS = 1000  # SMACOF / placement iterations at most
TOLERANCE = 1e-10  # stop when the relative stress decrease falls below it


def _fits(populations: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Means [J, d] and covariances + ridge [J, d, d] (float64) of cell populations."""
    means, covs = zip(*(gaussian_moments(torch.from_numpy(np.asarray(p, np.float64)), COVARIANCE_RIDGE)
                        for p in populations))
    return torch.stack(means), torch.stack(covs)


def classical_mds(distances: np.ndarray, dims: int) -> np.ndarray:
    """Torgerson's MDS [J, dims]: the top eigenvectors of -1/2 H D^2 H (H centres), signs fixed so the
    largest |entry| of each axis is positive (a deterministic start for SMACOF)."""
    n = len(distances)
    centre = np.eye(n) - 1.0 / n
    values, vectors = np.linalg.eigh(-0.5 * centre @ np.square(distances) @ centre)
    order = np.argsort(values)[::-1][:dims]
    points = vectors[:, order] * np.sqrt(np.clip(values[order], 0.0, None))
    signs = np.sign(points[np.abs(points).argmax(0), np.arange(points.shape[1])])
    return points * np.where(signs == 0, 1.0, signs)


def stress(points: np.ndarray, distances: np.ndarray) -> float:
    """Raw stress sum_{i<j} (delta_ij - |x_i - x_j|)^2."""
    fitted = np.linalg.norm(points[:, None] - points[None], axis=-1)
    return 0.5 * float(np.square(distances - fitted).sum())


def smacof(distances: np.ndarray, dims: int) -> np.ndarray:
    """Metric MDS [J, dims] of a symmetric distance matrix by SMACOF: X <- B(X) X / J, with
    B_ij = -delta_ij / |x_i - x_j| (i != j, 0 where points coincide) and B_ii = -sum_{j != i} B_ij;
    each Guttman transform does not increase the stress."""
    points, n = classical_mds(distances, dims), len(distances)
    before = stress(points, distances)
    for _ in range(ITERATIONS):
        fitted = np.linalg.norm(points[:, None] - points[None], axis=-1)
        ratio = np.divide(distances, fitted, out=np.zeros_like(fitted), where=fitted > 0)
        b = -ratio
        np.fill_diagonal(b, ratio.sum(1) - np.diag(ratio))
        points = b @ points / n
        after = stress(points, distances)
        if before - after <= TOLERANCE * max(before, 1e-300):
            break
        before = after
    return points


def place(points: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """A new point y [dims] beside fixed `points` [J, dims] at distances delta [J], minimising
    sum_j (delta_j - |y - x_j|)^2 by majorization: y <- mean_j (x_j + delta_j (y - x_j) / |y - x_j|);
    it starts at the point of the nearest population."""
    y = points[int(np.argmin(distances))].copy()
    before = float(np.square(distances - np.linalg.norm(y - points, axis=1)).sum())
    for _ in range(ITERATIONS):
        gaps = np.linalg.norm(y - points, axis=1)
        pull = np.divide(distances, gaps, out=np.zeros_like(gaps), where=gaps > 0)
        y = (points + pull[:, None] * (y - points)).mean(0)
        after = float(np.square(distances - np.linalg.norm(y - points, axis=1)).sum())
        if before - after <= TOLERANCE * max(before, 1e-300):
            break
        before = after
    return y


def mode_of_action(seen: dict[str, np.ndarray], unseen: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Points (float32, |coordinate| <= 1 over the seen ones) of perturbations from their cells
    [n, d]: the MDS of the `seen` populations (at least two), then each of `unseen` placed by its
    distances to them (module docstring)."""
    if len(seen) < 2:
        raise ValueError(f"a mode-of-action embedding needs two perturbations with training cells, got {len(seen)}")
    labels = sorted(seen)
    means, covs = _fits([seen[label] for label in labels])
    distances = gaussian_w2(means, covs, means, covs).numpy()
    distances = 0.5 * (distances + distances.T)
    np.fill_diagonal(distances, 0.0)
    points = smacof(distances, min(MOA_DIMS, len(labels) - 1))
    out = dict(zip(labels, points))
    if unseen:
        new = sorted(unseen)
        new_means, new_covs = _fits([unseen[label] for label in new])
        to_seen = gaussian_w2(new_means, new_covs, means, covs).numpy()
        out |= {label: place(points, row) for label, row in zip(new, to_seen)}
    scale = float(np.abs(points).max()) or 1.0
    return {label: (point / scale).astype(np.float32) for label, point in out.items()}
