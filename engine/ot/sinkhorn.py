"""Entropic (unbalanced) optimal transport for a stack of K problems at once, log domain, in torch.

Problem (Chizat et al. 2018; POT's `ot.unbalanced.sinkhorn_unbalanced` with reg_type "kl"):

    min_P  <P, C> + eps KL(P | a x b) + reg_m KL(P 1 | a) + reg_m KL(P^T 1 | b)

over P >= 0, for cost C [K, n, m] and marginals a [K, n], b [K, m]; reg_m = inf is balanced OT.
Its solution is P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps) for the dual potentials fixed by

    f_i = -rho eps log sum_j b_j exp((g_j - C_ij) / eps)
    g_j = -rho eps log sum_i a_i exp((f_i - C_ij) / eps),      rho = reg_m / (reg_m + eps)

(rho = 1 when balanced). Alternating these updates is Sinkhorn's algorithm in the log domain
(f = eps log u, g = eps log v of POT's scalings), which stays finite at small eps where the
kernel exp(-C / eps) underflows (NubOT, Lübeck et al. 2022: eps = 0.005 on a cost scaled to
max 1, i.e. kernel values down to exp(-200), 0 in float32). Where (cost + |potentials|) / eps spans
less than KERNEL_SPAN (per problem), the same updates run on the float64 kernel and the scalings u = exp(f / eps),
v = exp(g / eps) (two matrix-vector products per iteration instead of two log-sum-exps; results in
the cost's dtype).

Stacking: each problem iterates on its own; every `check_every` iterations the problems whose
potentials moved by less than `tol` (max |change| / eps, i.e. the log-scalings) stop and the
others go on as a smaller stack, so the result of a problem does not depend on its stack (the
stacked solve equals K separate ones) and converged problems cost nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

NUBOT_EPS = 0.005  # NubOT's entropic regularisation (on a cost divided by its max)
NUBOT_REG_M = 0.05  # NubOT's marginal relaxation
MAX_ITERATIONS = 1000  # NubOT's cap (POT's default numItermax)
TOLERANCE = 1e-6  # on the change of the log-scalings per check
CHECK_EVERY = 10  # iterations between two convergence checks (one host sync each)
KERNEL_SPAN = 600.0  # largest (cost + potentials) / eps range iterated on the float64 kernel (exp(-600) ~ 1e-261)


@dataclass
class Potentials:
    """Dual potentials f [K, n], g [K, m] of a solve, and the iterations each problem took [K]."""

    f: Tensor
    g: Tensor
    iterations: Tensor


def _log_weights(weights: Tensor | None, cost: Tensor, dim: int) -> Tensor:
    """log of the marginal weights along `dim` of cost [K, n, m] (uniform 1/size when None)."""
    size = cost.shape[dim]
    if weights is None:
        return torch.full((cost.shape[0], size), -math.log(size), dtype=cost.dtype, device=cost.device)
    return weights.to(cost.dtype).log()


@torch.no_grad()
def sinkhorn_potentials(
    cost: Tensor,
    eps: float,
    reg_m: float = math.inf,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    max_iterations: int = MAX_ITERATIONS,
    tol: float = TOLERANCE,
    check_every: int = CHECK_EVERY,
    init: tuple[Tensor, Tensor] | None = None,
) -> Potentials:
    """Dual potentials (f, g) of the stacked problems for cost [K, n, m] (see the module docstring).

    a [K, n], b [K, m]: marginal weights (uniform when None; a zero weight removes a point).
    init: starting potentials (f, g) (zeros when None), e.g. from a larger eps.
    Problem k stops at the first check (every `check_every` iterations) where its potentials moved
    by at most `tol * eps` over the last iteration, or after `max_iterations`.
    """
    log_a, log_b = _log_weights(a, cost, 1), _log_weights(b, cost, 2)
    rho = 1.0 if math.isinf(reg_m) else reg_m / (reg_m + eps)
    f = torch.zeros_like(log_a) if init is None else init[0].to(cost.dtype).clone()
    g = torch.zeros_like(log_b) if init is None else init[1].to(cost.dtype).clone()
    iterations = torch.zeros(cost.shape[0], dtype=torch.int64, device=cost.device)
    on_kernel = _kernel_is_safe(cost, f, g, eps)
    for group, iterate in ((on_kernel.nonzero().squeeze(1), _kernel_iterations),
                           ((~on_kernel).nonzero().squeeze(1), _log_iterations)):
        if group.numel() == 0:
            continue
        if iterate is _kernel_iterations:
            kernel = torch.exp(-cost[group].double() / eps)
            matrices: tuple[Tensor, ...] = (kernel, kernel.transpose(1, 2).contiguous())
        else:
            matrices = (cost[group] / eps,)
        active = torch.arange(group.numel(), device=cost.device)  # positions in the group
        done = 0
        while done < max_iterations and active.numel() > 0:
            steps = min(check_every, max_iterations - done)
            now = matrices if active.numel() == group.numel() else tuple(m[active] for m in matrices)
            k = group[active]
            fk, gk, change = iterate(now, log_a[k], log_b[k], f[k], g[k], eps, rho, steps)
            done += steps
            f[k], g[k] = fk.to(f.dtype), gk.to(g.dtype)
            iterations[k] = done
            active = active[~(change <= tol)]  # NaN counts as not converged (and stops at max_iterations)
    return Potentials(f, g, iterations)


def _kernel_is_safe(cost: Tensor, f: Tensor, g: Tensor, eps: float) -> Tensor:
    """Per problem [K] (bool): can its iterations run on the kernel exp(-C / eps) in float64 without
    under- or overflow? (Decided per problem, so that a problem's result does not depend on its stack.)"""
    flat = cost.flatten(1)
    span = (flat.amax(1) - flat.amin(1).clamp_max(0) + f.abs().amax(1) + g.abs().amax(1)) / eps
    return span < KERNEL_SPAN  # NaN: False (the log domain)


def _log_iterations(matrices: tuple[Tensor, ...], log_a: Tensor, log_b: Tensor, f: Tensor, g: Tensor, eps: float,
                    rho: float, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """`steps` log-domain updates of (f, g) given (C / eps,); also f's last change / eps per problem."""
    (scaled,) = matrices
    for _ in range(steps):
        previous = f
        f = -rho * eps * torch.logsumexp(log_b.unsqueeze(1) + g.unsqueeze(1) / eps - scaled, dim=2)
        g = -rho * eps * torch.logsumexp(log_a.unsqueeze(2) + f.unsqueeze(2) / eps - scaled, dim=1)
    return f, g, (f - previous).abs().amax(1) / eps


def _kernel_iterations(matrices: tuple[Tensor, ...], log_a: Tensor, log_b: Tensor, f: Tensor, g: Tensor, eps: float,
                       rho: float, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """The same updates on scalings u = exp(f / eps), v = exp(g / eps) given the kernel K = exp(-C / eps)
    and K^T (float64, contiguous): u = (K (b v))^-rho, v = (K^T (a u))^-rho, two matrix-vector
    products per iteration (POT's sinkhorn_knopp_unbalanced), several times faster than the
    log-sum-exps. The scalings are row vectors [K, 1, n]: a row vector times a matrix is ~4x faster
    than the matrix times a column."""
    kernel, kernel_t = matrices
    a, b = log_a.double().exp().unsqueeze(1), log_b.double().exp().unsqueeze(1)
    u, v = (f.double() / eps).exp().unsqueeze(1), (g.double() / eps).exp().unsqueeze(1)
    for _ in range(steps):
        previous = u
        u = torch.bmm(b * v, kernel_t).pow(-rho)
        v = torch.bmm(a * u, kernel).pow(-rho)
    log_u = u.squeeze(1).log()
    return eps * log_u, eps * v.squeeze(1).log(), (log_u - previous.squeeze(1).log()).abs().amax(1)


def transport_plan(cost: Tensor, potentials: Potentials, eps: float, a: Tensor | None = None,
                   b: Tensor | None = None) -> Tensor:
    """P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps) [K, n, m]."""
    log_a, log_b = _log_weights(a, cost, 1), _log_weights(b, cost, 2)
    f, g = potentials.f, potentials.g
    return torch.exp(log_a.unsqueeze(2) + log_b.unsqueeze(1) + (f.unsqueeze(2) + g.unsqueeze(1) - cost) / eps)


@torch.no_grad()
def unbalanced_sinkhorn(
    cost: Tensor, eps: float = NUBOT_EPS, reg_m: float = NUBOT_REG_M, a: Tensor | None = None,
    b: Tensor | None = None, **options
) -> Tensor:
    """The unbalanced entropic plan [K, n, m] for cost [K, n, m] (options: sinkhorn_potentials)."""
    return transport_plan(cost, sinkhorn_potentials(cost, eps, reg_m, a, b, **options), eps, a, b)

