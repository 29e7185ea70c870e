"""Closed-form W2 transport between Gaussians (batched over a leading map axis).

For N(m_s, S) -> N(m_t, T) the optimal map is x -> m_t + A (x - m_s) with
A = S^{-1/2} (S^{1/2} T S^{1/2})^{1/2} S^{-1/2} (the Bures map), symmetric positive definite.
Used for the Gaussian initialisation of ICNN potentials (CondOT, Bunne et al. 2022), the
`gaussian` baseline and ground-truth tests (L2-UVP).
"""
from __future__ import annotations

import torch

COVARIANCE_RIDGE = 1e-2  # added to each covariance before the Bures map (SOLVERS.md)


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of symmetric PSD matrices [..., d, d] by eigendecomposition."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt().unsqueeze(-2)) @ vectors.transpose(-1, -2)


def bures_map(
    source_mean: torch.Tensor, source_cov: torch.Tensor, target_mean: torch.Tensor, target_cov: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (A, b) with T(x) = x A + b the W2-optimal map between the two Gaussians (rows as cells).

    Shapes: means [..., d], covariances [..., d, d]; A [..., d, d] symmetric, b [..., d].
    """
    s_half = sqrtm_psd(source_cov)
    s_inv_half = torch.linalg.inv(s_half)
    middle = sqrtm_psd(s_half @ target_cov @ s_half)
    a = s_inv_half @ middle @ s_inv_half
    a = 0.5 * (a + a.transpose(-1, -2))
    b = target_mean - (source_mean.unsqueeze(-2) @ a).squeeze(-2)
    return a, b


def gaussian_moments(cells: torch.Tensor, ridge: float = COVARIANCE_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [d] and covariance + ridge * I [d, d] of cells [n, d] (unbiased covariance)."""
    mean = cells.mean(0)
    centered = cells - mean
    cov = centered.T @ centered / max(cells.shape[0] - 1, 1)
    return mean, cov + ridge * torch.eye(cells.shape[1], dtype=cells.dtype, device=cells.device)


def gaussian_w2(
    means_a: torch.Tensor, covs_a: torch.Tensor, means_b: torch.Tensor, covs_b: torch.Tensor
) -> torch.Tensor:
    """W2 distances [A, B] between Gaussians N(m_i, S_i) and N(m_j, T_j) (means [., d], covs [., d, d]):
    W2^2 = |m_i - m_j|^2 + tr S_i + tr T_j - 2 tr (S_i^1/2 T_j S_i^1/2)^1/2 (the Bures-Wasserstein distance)."""
    cross = torch.stack([  # one row at a time: [B, d, d] per row, not [A, B, d, d]
        torch.linalg.eigvalsh(half @ covs_b @ half).clamp_min(0).sqrt().sum(-1) for half in sqrtm_psd(covs_a)
    ])
    traces_a, traces_b = (torch.diagonal(c, dim1=-2, dim2=-1).sum(-1) for c in (covs_a, covs_b))
    squared = torch.cdist(means_a, means_b).square() + traces_a.unsqueeze(1) + traces_b.unsqueeze(0) - 2 * cross
    return squared.clamp_min(0).sqrt()
