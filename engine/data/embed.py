"""Linear embeddings of the data space (PCA), with their inverse."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg


@dataclass(eq=False)
class Embedding:
    """PCA: z = (x - mu) C^T and x_hat = z C + mu, with C [k, d] orthonormal rows, mu [d]."""

    mean: np.ndarray
    components: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Latent coordinates float32 [n, k] of data-space cells [n, d]."""
        return np.ascontiguousarray((x - self.mean) @ self.components.T, dtype=np.float32)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Data-space cells float32 [n, d] of latent points [n, k] (exact on the PCA subspace)."""
        return np.ascontiguousarray(z @ self.components + self.mean, dtype=np.float32)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Embedding)
            and np.array_equal(self.mean, other.mean)
            and np.array_equal(self.components, other.components)
        )


def fit_pca(x: np.ndarray, k: int) -> Embedding:
    """Top-k principal axes of the rows of x (Pearson 1901), requires k <= min(n, d).

    With Xc = X - mean: the top-k eigenvectors C^T of Xc^T Xc when d <= n, else C = U^T Xc / s from
    the top-k eigenpairs (U, s^2) of Xc Xc^T (the right singular vectors of Xc either way). Only k
    eigenpairs are computed (LAPACK syevr, float64). Signs are fixed so that the largest |entry| of
    each axis is positive, which makes the result deterministic.
    """
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    centered = x - mean
    n, d = centered.shape
    small = centered.T @ centered if d <= n else centered @ centered.T
    m = small.shape[0]
    values, vectors = scipy.linalg.eigh(small.astype(np.float64), subset_by_index=[m - k, m - 1])
    values, vectors = values[::-1], vectors[:, ::-1]
    if d <= n:
        components = vectors.T
    else:
        components = (vectors.T @ centered.astype(np.float64)) / np.sqrt(np.maximum(values, 1e-12))[:, None]
    pivot = np.abs(components).argmax(axis=1)
    components = components * np.sign(components[np.arange(k), pivot])[:, None]
    return Embedding(mean, np.ascontiguousarray(components, dtype=np.float32))
