"""Optimisation helpers shared by the solvers: a stacked Adam step, Adam for a potential, the cosine schedule."""
from __future__ import annotations

import math

import torch

from engine.nn.icnn import StackedICNN


def adam_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One step on the sum of per-map losses [K] (maps share no parameter, so they stay independent).

    A parameter the loss does not reach keeps .grad None (e.g. the output bias of a potential whose
    gradient is the map). Gradients are made contiguous: a gate's gradient comes back expanded
    (stride 0), and torch's fused CPU Adam reads such a gradient as if it were dense (garbage
    moments, NaN within 10 steps).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p, grad in zip(params, torch.autograd.grad(loss.sum(), params, allow_unused=True)):
        p.grad = None if grad is None else grad.contiguous()
    optimizer.step()


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, final_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    """lr_t = lr (c + (1 - c) (1 + cos(pi t / T)) / 2) for t <= T = steps, then lr c (c = final_fraction)."""
    total = max(steps, 1)

    def factor(step: int) -> float:
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def potential_adam(net: StackedICNN, lr: float, gate_lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    """Adam over a potential's parameters; the gate on its quadratic start (if any) gets its own gate_lr."""
    if net.quadratic is None:
        return torch.optim.Adam(net.parameters(), lr=lr, betas=betas, fused=True)
    gate = net.quadratic.gate
    rest = [p for p in net.parameters() if p is not gate]
    return torch.optim.Adam([{"params": rest}, {"params": [gate], "lr": gate_lr}], lr=lr, betas=betas, fused=True)
