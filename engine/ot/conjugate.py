"""Convex conjugates of stacked potentials, fine-tuned from an amortised guess.

For a convex potential g and a target point y, the conjugate g*(y) = max_x <x, y> - g(x) is attained
at the x with grad g(x) = y. Amos (2023, "On amortizing convex conjugates for optimal transport")
predicts that x with a network (the amortisation) and fine-tunes the prediction with a few steps of
a numerical solver, so that the dual objective's gradient is exact (Danskin) instead of that of an
inexact min-max. Our solver, batched over [K, b, d] with no host synchronisation:

    x <- x + a (y - grad g(x)) P        (accepted only where <x, y> - g(x) increases)

P approximates the inverse Hessian of g (its quadratic start's (s A)^-1, or I), so one step is exact
for a quadratic g. The step length a starts at 1 per point, halves after a rejected step and doubles
(up to 1) after an accepted one: the objective never decreases, however far g is from quadratic.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

Potential = Callable[[torch.Tensor], torch.Tensor]  # [K, b, d] -> [K, b, 1]


class Conjugate(NamedTuple):
    points: torch.Tensor  # argmax x*(y) [K, b, d] (detached)
    values: torch.Tensor  # g*(y) = <x*, y> - g(x*) [K, b] (detached)
    residual: torch.Tensor  # mean ||y - grad g(x*)|| per map [K]: 0 at the exact argmax


def value_and_gradient(potential: Potential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g(x) [K, b] and grad g(x) [K, b, d], both detached (one forward and one backward pass)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        value = potential(x)
        (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach().squeeze(-1), grad


@torch.no_grad()
def fine_tune_conjugate(
    potential: Potential,
    y: torch.Tensor,
    start: torch.Tensor,
    iterations: int,
    preconditioner: torch.Tensor | None = None,
) -> Conjugate:
    """Maximise <x, y> - g(x) over x for every point y [K, b, d], starting at `start` [K, b, d].

    preconditioner: [K, d, d] (approximately the inverse Hessian of g), or None for the identity.
    Costs `iterations` + 1 evaluations of g and its gradient.
    """
    x = start.detach()
    value, grad = value_and_gradient(potential, x)
    objective = (x * y).sum(-1) - value
    length = torch.ones_like(objective)
    for _ in range(iterations):
        direction = y - grad if preconditioner is None else torch.bmm(y - grad, preconditioner)
        candidate = x + length.unsqueeze(-1) * direction
        c_value, c_grad = value_and_gradient(potential, candidate)
        c_objective = (candidate * y).sum(-1) - c_value
        better = c_objective >= objective  # NaN candidates are rejected
        x = torch.where(better.unsqueeze(-1), candidate, x)
        grad = torch.where(better.unsqueeze(-1), c_grad, grad)
        objective = torch.where(better, c_objective, objective)
        length = torch.where(better, (2 * length).clamp(max=1.0), 0.5 * length)
    return Conjugate(x, objective, (y - grad).norm(dim=-1).mean(-1))
