"""Optimisation helpers shared by the solvers: a stacked Adam step, Adam for a potential, the cosine schedule."""
from __future__ import annotations

import math
from typing import Callable

import torch

from engine.nn.icnn import StackedICNN

Average = Callable[[list[torch.Tensor]], None]  # in place: each tensor <- its batch-weighted mean over the workers


def worker_average(weight: float, all_reduce: Callable[[torch.Tensor], None]) -> Average:
    """The Average of a data-parallel worker whose share of the global batch is `weight`: in place,
    t <- sum over workers of weight_w t_w, through one `all_reduce` (an in-place sum over the workers,
    e.g. torch.distributed.all_reduce) of all the tensors flattened together."""

    def average(tensors: list[torch.Tensor]) -> None:
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors]) * weight
        all_reduce(flat)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    return average


def adam_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, average: Average | None = None) -> None:
    """One step on the sum of per-map losses [K] (maps share no parameter, so they stay independent).

    A parameter the loss does not reach keeps .grad None (e.g. the output bias of a potential whose
    gradient is the map). Gradients are made contiguous: a gate's gradient comes back expanded
    (stride 0), and torch's fused CPU Adam reads such a gradient as if it were dense (garbage
    moments, NaN within 10 steps). `average` (data-parallel training, StackSolver.average) averages
    the gradients over the workers before the step: the gradient of the global batch's loss.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
    reached = [(p, grad.contiguous()) for p, grad in zip(params, grads) if grad is not None]
    if average is not None:
        average([grad for _, grad in reached])
    for p in params:
        p.grad = None
    for p, grad in reached:
        p.grad = grad
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
