"""Distances between cell populations (SOLVERS.md, "Evaluation metrics").

All torch functions take point clouds ``[..., n, d]`` (float32 or float64, any device) and are batched
over the leading dims, so a stack of K maps is evaluated in one call. They are evaluation metrics:
they run without autograd.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import ot
import torch
from torch import Tensor

MMD_GAMMAS: tuple[float, ...] = (2.0, 1.0, 0.5, 0.1, 0.01, 0.005)
"""RBF bandwidths of the training / validation MMD (CellOT, NubOT)."""

MMD50_GAMMAS: tuple[float, ...] = tuple(float(g) for g in np.logspace(1, -3, 50))
"""The 50 bandwidths of CellOT's final evaluation and W1OT: logspace(1, -3, 50)."""

_MMD_BUFFER_BYTES = 1 << 30
"""Largest kernel buffer `mmd` allocates; above it the stack axis is processed in chunks."""

_MIN_EXPONENT = -80.0
"""Smallest RBF exponent -gamma d2 that `mmd` evaluates (exp(-80) ~ 1.8e-35)."""

# sinkhorn_divergence schedule (CyTOF, 1000 cells: within 3e-4 of the converged OT_eps, ~100 iterations)
_SCALING = 0.5  # eps halves after each annealing step
_STEP_ITERATIONS = 6  # Sinkhorn iterations per annealing step
_BLOCK = 10  # Sinkhorn iterations between two checks of the dual value at the final eps
_RTOL = 1e-4  # relative change of the dual value that ends the final iterations
_MAX_ITERATIONS = 2000


@torch.no_grad()
def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise ``||x_i - y_j||^2`` for ``x [..., n, d]``, ``y [..., m, d]`` -> ``[..., n, m]``.

    Computed as ``|x|^2 + |y|^2 - 2 x.y`` after centring both clouds on the mean of ``x`` (the
    distances are translation invariant; centring shrinks the cancellation error), clamped at 0.
    """
    centre = x.mean(dim=-2, keepdim=True)
    x = x - centre
    y = y - centre
    x_norm = x.square().sum(-1)
    y_norm = y.square().sum(-1)
    d2 = torch.matmul(x, y.transpose(-1, -2)).mul_(-2.0)
    d2.add_(x_norm.unsqueeze(-1)).add_(y_norm.unsqueeze(-2))
    return d2.clamp_(min=0.0)


def _normalised(weights: Tensor | None, like: Tensor) -> Tensor:
    """Weights ``[..., n]`` summing to 1 over the last dim (uniform when None)."""
    if weights is None:
        n = like.shape[-2]
        return torch.full(like.shape[:-1], 1.0 / n, dtype=like.dtype, device=like.device)
    weights = weights.to(dtype=like.dtype, device=like.device)
    return weights / weights.sum(-1, keepdim=True)


def _kernel_forms(u: Tensor, v: Tensor, a: Tensor, b: Tensor, gammas: Sequence[float], out: Tensor) -> None:
    """Add ``sum_g a^T exp(-gamma_g D) b`` to ``out [K]`` with ``D = squared_distances(u, v)``.

    ``D`` is computed once; one kernel buffer of D's shape is reused for every gamma. Exponents are
    clamped at ``_MIN_EXPONENT``, which moves each kernel value by less than 2e-35 and keeps float32
    ``exp`` off its slow underflow path (5-13x slower below -87).
    """
    d2 = squared_distances(u, v)
    kernel = torch.empty_like(d2)
    for gamma in gammas:
        torch.mul(d2, -float(gamma), out=kernel).clamp_(min=_MIN_EXPONENT).exp_()
        out.add_(torch.matmul(kernel, b.unsqueeze(-1)).squeeze(-1).mul_(a).sum(-1))


@torch.no_grad()
def mmd(
    x: Tensor,
    y: Tensor,
    gammas: Sequence[float] = MMD_GAMMAS,
    x_weights: Tensor | None = None,
    y_weights: Tensor | None = None,
) -> Tensor:
    """Squared MMD with RBF kernels, averaged over ``gammas``; batched over a stack of maps.

    ``MMD^2_gamma = sum_ij a_i a_j k(x_i, x_j) + sum_ij b_i b_j k(y_i, y_j) - 2 sum_ij a_i b_j k(x_i, y_j)``
    with ``k(x, y) = exp(-gamma ||x - y||^2)``: the biased V-statistic with diagonals (Gretton et al.
    2012), as CellOT (Bunne et al. 2023) reports it. ``a``, ``b`` are the weights normalised to sum 1
    per map (uniform when None). NubOT's weighted MMD (Lübeck et al. 2022) passes the predicted
    cells' weights as ``x_weights``. A zero weight removes a point, so maps with different cell
    counts share one padded stack (padded rows must be finite, e.g. zeros).

    Shapes: ``x [K, n, d]``, ``y [K, m, d]``, weights ``[K, n]`` / ``[K, m]`` -> ``[K]``;
    2-D inputs give a 0-dim tensor. Each of the three distance matrices is computed once and reused
    for all gammas; at most ~1 GiB of kernel buffer is live (larger stacks are chunked over K).
    """
    a = _normalised(x_weights, x)
    b = _normalised(y_weights, y)
    if x.dim() == 2:
        return mmd(x[None], y[None], gammas, a[None], b[None])[0]
    n, m = x.shape[-2], y.shape[-2]
    per_map = max(n, m) ** 2 * x.element_size() * 2  # one distance matrix + its kernel buffer
    chunk = max(1, _MMD_BUFFER_BYTES // per_map)
    result = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk):
        s = slice(start, start + chunk)
        xx = torch.zeros_like(result[s])
        yy = torch.zeros_like(xx)
        xy = torch.zeros_like(xx)
        _kernel_forms(x[s], x[s], a[s], a[s], gammas, xx)
        _kernel_forms(y[s], y[s], b[s], b[s], gammas, yy)
        _kernel_forms(x[s], y[s], a[s], b[s], gammas, xy)
        result[s] = (xx + yy - 2.0 * xy) / len(gammas)
    return result


@torch.no_grad()
def energy_distance(x: Tensor, y: Tensor) -> Tensor:
    """Energy distance ``2 E||x - y|| - E||x - x'|| - E||y - y'||`` (Székely & Rizzo 2013).

    Non-squared Euclidean norms, V-statistics (diagonals included); ``[..., n, d]`` -> ``[...]``.
    """
    xy = squared_distances(x, y).sqrt_().mean((-2, -1))
    xx = squared_distances(x, x).sqrt_().mean((-2, -1))
    yy = squared_distances(y, y).sqrt_().mean((-2, -1))
    return 2.0 * xy - xx - yy


@torch.no_grad()
def l2_means(x: Tensor, y: Tensor) -> Tensor:
    """``||mean(x) - mean(y)||_2``, the distance of the perturbation signatures; ``[..., n, d]`` -> ``[...]``."""
    return torch.linalg.vector_norm(x.mean(-2) - y.mean(-2), dim=-1)


@torch.no_grad()
def r_means(x: Tensor, y: Tensor) -> Tensor:
    """Pearson r between the feature-mean vectors of ``x`` and ``y`` (CellOT; W1OT reports r^2)."""
    mx = x.mean(-2)
    my = y.mean(-2)
    mx = mx - mx.mean(-1, keepdim=True)
    my = my - my.mean(-1, keepdim=True)
    return (mx * my).sum(-1) / (
        torch.linalg.vector_norm(mx, dim=-1) * torch.linalg.vector_norm(my, dim=-1)
    )


@torch.no_grad()
def knn_enrichment(pred: Tensor, obs: Tensor, k: int = 50, chunk: int = 1024) -> Tensor:
    """Mean fraction of predicted cells among the k nearest neighbours of each predicted cell.

    Neighbours are searched in ``pred ∪ obs`` with the query cell itself excluded (CellOT, Bunne et
    al. 2023). With equal sizes, 0.5 means perfectly mixed and 1 fully separated. ``pred [n, d]``,
    ``obs [m, d]`` -> 0-dim tensor; query rows are processed ``chunk`` at a time.

    Raises ValueError unless ``1 <= k <= n + m - 2``: at k = n + m - 1 every other cell is a neighbour
    and the value is (n - 1) / (n + m - 1) whatever the cells (`evaluate_map` asks for n = m >= 2k).
    """
    union = torch.cat([pred, obs])
    if not 1 <= k <= union.shape[0] - 2:
        raise ValueError(f"knn_enrichment needs 1 <= k <= {union.shape[0] - 2} for {union.shape[0]} cells, got k={k}")
    hits = 0
    for start in range(0, pred.shape[0], chunk):
        query = pred[start : start + chunk]
        d2 = squared_distances(query, union)
        rows = torch.arange(query.shape[0], device=d2.device)
        d2[rows, rows + start] = float("inf")
        neighbours = d2.topk(k, dim=-1, largest=False).indices
        hits += int((neighbours < pred.shape[0]).sum())
    return torch.tensor(hits / (pred.shape[0] * k), dtype=torch.float64)


@torch.no_grad()
def l2_uvp(t_hat: Tensor, t_star: Tensor, target_cov_trace: float) -> Tensor:
    """Unexplained variance ``100 * E||T_hat(x) - T*(x)||^2 / tr Cov(target)`` (Korotin et al. 2021)."""
    return 100.0 * (t_hat - t_star).square().sum(-1).mean(-1) / target_cov_trace


@torch.no_grad()
def cosine(displacement_hat: Tensor, displacement_star: Tensor) -> Tensor:
    """Mean cosine between ``T_hat(x) - x`` and ``T*(x) - x`` (Korotin et al. 2021)."""
    return torch.nn.functional.cosine_similarity(displacement_hat, displacement_star, dim=-1).mean(-1)


def _entropic_ot(x: Tensor, y: Tensor, eps: float) -> float:
    """``OT_eps(x, y)`` by eps-scaling over POT's log-domain Sinkhorn (see `sinkhorn_divergence`)."""
    cost = 0.5 * squared_distances(x, y)
    a = torch.full((cost.shape[0],), 1.0 / cost.shape[0], dtype=cost.dtype, device=cost.device)
    b = torch.full((cost.shape[1],), 1.0 / cost.shape[1], dtype=cost.dtype, device=cost.device)
    log_u, log_v = torch.zeros_like(a), torch.zeros_like(b)  # POT's log scalings: f = eps log_u
    current = max(float(cost.max()), eps)
    value, iterations = -math.inf, 0
    while True:
        final = current <= eps
        _, log = ot.sinkhorn(
            a, b, cost, current, method="sinkhorn_log", numItermax=_BLOCK if final else _STEP_ITERATIONS,
            stopThr=0.0, warmstart=(log_u, log_v), log=True, warn=False,
        )
        log_u, log_v = log["log_u"], log["log_v"]
        iterations += log["niter"] + 1
        if not final:  # keep the potentials f, g fixed while eps shrinks
            smaller = max(current * _SCALING, eps)
            log_u, log_v = log_u * (current / smaller), log_v * (current / smaller)
            current = smaller
            continue
        previous = value  # dual value <a, f> + <b, g> of the KL(P | a x b) problem, f = eps (log_u - log a)
        value = float(eps * ((log_u - a.log()) @ a + (log_v - b.log()) @ b))
        if abs(value - previous) <= _RTOL * (abs(value) + eps) or iterations >= _MAX_ITERATIONS:
            return value


def sinkhorn_divergence(x: np.ndarray | Tensor, y: np.ndarray | Tensor, eps: float = 0.01) -> float:
    """Debiased Sinkhorn divergence ``S = OT_eps(x, y) - (OT_eps(x, x) + OT_eps(y, y)) / 2`` (float).

    ``OT_eps(x, y) = min_P <P, C> + eps KL(P | a x b)`` over couplings P of uniform weights a, b, with
    cost ``C_ij = 0.5 ||x_i - y_j||^2``: Feydy et al. 2019 and geomloss's p=2 convention, so CondOT's
    blur 0.1 is eps = blur^2 = 0.01. ``S(x, x) = 0`` and a translation by t gives ``0.5 ||t||^2``.

    Solver: POT's log-domain Sinkhorn (``ot.sinkhorn(method="sinkhorn_log")``, float32 torch backend)
    with eps-scaling. Plain Sinkhorn at eps = 0.01 is still unconverged after thousands of iterations
    on CyTOF scales (max C ~ 100), so eps starts at max C and shrinks by ``_SCALING`` every
    ``_STEP_ITERATIONS`` iterations, the potentials carried over as warm starts; at ``eps`` it
    iterates in blocks of ``_BLOCK`` until the dual value ``<a, f> + <b, g>`` (a lower bound of
    OT_eps, exact at convergence) changes by less than ``_RTOL (|value| + eps)``, at most
    ``_MAX_ITERATIONS`` iterations in all (about 100 per OT_eps on CyTOF, 1000 cells).
    """
    x = torch.as_tensor(x).float()
    y = torch.as_tensor(y).float()
    return _entropic_ot(x, y, eps) - 0.5 * (_entropic_ot(x, x, eps) + _entropic_ot(y, y, eps))
