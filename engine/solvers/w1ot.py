"""W1OT: a 1-Lipschitz Kantorovich potential, then an adversarially learned step size (Chen et al. 2024).

Kantorovich-Rubinstein: W1(mu, nu) = max over 1-Lipschitz f of E_mu[f(x)] - E_nu[f(y)]. The
maximiser's gradient gives the direction of transport but not its length, so W1OT trains in two
phases (the plan):

1. "potential" (does not select: it moves no cell): f is a stacked GroupSort network with
   orthonormal layers (engine.nn.lipschitz; 1-Lipschitz by construction, no gradient penalty);
       loss_potential = -(mean f(x) - mean f(y))                          (minimised)
   Adam lr 1e-2 cosine-annealed to 1e-4 over the phase, betas (0.5, 0.5). The maximised value is
   the dual W1 estimate, logged per map as `w1_estimate`.
2. "step_size" (selects the best state by validation MMD): with the direction
   d(x) = grad f(x) / ||grad f(x)|| (detached), T(x) = x - eta(x) d(x), eta >= 0 an MLP
   (LeakyReLU, Softplus output) and a discriminator D (MLP, Sigmoid output), non-saturating GAN,
   one D step then one eta step per outer step, Adam lr 1e-4:
       loss_d   = -mean log D(y) - mean log(1 - D(T(x)))    (T(x) detached)
       loss_eta = -mean log D(T(x))                           (D after its step)
   computed from D's logits (log D = logsigmoid(logit)), which is the same loss without log(0).

The same normalised direction d(x) is used at training and at inference (`transport`), as in the
paper's eq. (5). The authors' code (poseidonchan/w1ot, w1ot/ot.py) instead moves along the raw
gradient x - eta(x) grad f(x) both times (|grad f| <= 1, close to 1 where f is near optimal).

Steps: `potential_fraction` of the run's steps go to phase 1 (floor), the rest to phase 2; the
published 10k + 10k is `published_steps` = 20,000 with the default 0.5. Because the split follows the
total, a resume with another `--steps` changes the first phase and the checkpoint is refused.
Not from the paper: the LeakyReLU slope (0.2, as our ICNNs; torch's default is 0.01) and the step
size phase's Adam betas (torch's defaults); the authors' code uses RMSprop or Adam there with a
cosine schedule to 1e-5, which the paper does not mention (we keep the lr constant).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.nn import functional as F

from engine.nn.lipschitz import LipschitzPotential, StackedMLP
from engine.options import DataError
from engine.solvers.base import Phase, Plan, StackSolver, Transport
from engine.solvers.optim import adam_step, cosine_schedule
from engine.train.stack_data import StackData


@dataclass
class W1OTConfig:
    hidden: tuple[int, ...] = (64, 64, 64, 64)  # potential widths (then 64 -> 1, no activation)
    groups: int = 4  # GroupSort groups per layer (groups of 16 on a 64-wide layer)
    orthonormal: Literal["cayley", "bjorck"] = "cayley"
    bjorck_iterations: int = 20  # first-order Björck steps per forward (orthonormal = bjorck)
    lr: float = 1e-2  # potential: Adam lr, cosine-annealed over its phase to final_lr
    final_lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.5)
    step_hidden: tuple[int, ...] = (64, 64, 64, 64)  # eta and D widths
    negative_slope: float = 0.2  # LeakyReLU of eta and D (not stated in the paper)
    step_lr: float = 1e-4  # eta and D: Adam lr (constant)
    step_betas: tuple[float, float] = (0.9, 0.999)  # eta and D (not stated: torch's defaults)
    potential_fraction: float = 0.5  # share of the steps for phase 1 (published: 10k of 10k + 10k)

    def __post_init__(self) -> None:
        if not 0.0 <= self.potential_fraction <= 1.0:
            raise DataError(f"solver.potential_fraction must lie in [0, 1], got {self.potential_fraction}")
        if any(width % self.groups for width in self.hidden):
            raise DataError(f"GroupSort with {self.groups} groups needs widths divisible by it, got {tuple(self.hidden)}")


class W1OT(StackSolver):
    """W1 maps T(x) = x - eta(x) grad f / |grad f|: 1-Lipschitz potential, then a GAN-trained step size."""

    name = "w1ot"
    Config = W1OTConfig
    published_steps = 20_000

    def __init__(self, n_maps: int, dim: int, config: W1OTConfig, context_dim: int = 0) -> None:
        super().__init__(n_maps, dim, config, context_dim)
        self.f = LipschitzPotential(n_maps, dim, config.hidden, config.groups, config.orthonormal,
                                    config.bjorck_iterations)
        self.eta = StackedMLP(n_maps, dim, config.step_hidden, "softplus", config.negative_slope)
        self.discriminator = StackedMLP(n_maps, dim, config.step_hidden, "sigmoid", config.negative_slope)

    def init_map(self, k: int, generator: torch.Generator) -> None:
        for net in (self.f, self.eta, self.discriminator):
            net.init_map(k, generator)

    @classmethod
    def plan(cls, config: W1OTConfig, steps: int) -> Plan:
        potential = int(steps * config.potential_fraction)
        return Plan((Phase("potential", potential, selects_best=False), Phase("step_size", steps - potential)))

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        return {
            "potential": torch.optim.Adam(self.f.parameters(), lr=c.lr, betas=c.betas, fused=True),
            "eta": torch.optim.Adam(self.eta.parameters(), lr=c.step_lr, betas=c.step_betas, fused=True),
            "discriminator": torch.optim.Adam(self.discriminator.parameters(), lr=c.step_lr, betas=c.step_betas,
                                              fused=True),
        }

    def build_schedulers(self, plan: Plan) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """Cosine over the potential phase from lr to final_lr (stepped only in that phase)."""
        final = self.config.final_lr / self.config.lr
        return {"potential": cosine_schedule(self.optimizers["potential"], plan.phases[0].steps, final)}

    def train_step(self, data: StackData, step: int, phase: Phase) -> dict[str, torch.Tensor]:
        if phase.name == "potential":
            return self._potential_step(data)
        return self._step_size_step(data)

    def _potential_step(self, data: StackData) -> dict[str, torch.Tensor]:
        x, y = data.source_batch(), data.target_batch()
        values = self.f(torch.cat((x, y), dim=1))  # one pass: the orthonormal weights are built once
        w1 = values[:, : x.shape[1]].mean((1, 2)) - values[:, x.shape[1]:].mean((1, 2))
        adam_step(self.optimizers["potential"], -w1)
        self.schedulers["potential"].step()
        return {"w1_estimate": w1.detach(), "loss_potential": -w1.detach()}

    def _step_size_step(self, data: StackData) -> dict[str, torch.Tensor]:
        x, y = data.source_batch(), data.target_batch()
        direction, f_x = self.direction(x)
        moved = x - self.eta(x) * direction
        loss_d = (F.softplus(-self.discriminator.logits(y)).mean((1, 2))
                  + F.softplus(self.discriminator.logits(moved.detach())).mean((1, 2)))
        adam_step(self.optimizers["discriminator"], loss_d)
        loss_eta = F.softplus(-self.discriminator.logits(moved)).mean((1, 2))
        adam_step(self.optimizers["eta"], loss_eta)
        with torch.no_grad():
            w1 = f_x.mean((1, 2)) - self.f(y).mean((1, 2))
        return {"w1_estimate": w1, "loss_d": loss_d.detach(), "loss_eta": loss_eta.detach()}

    def direction(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """d(x) = grad f(x) / ||grad f(x)|| [K, b, d] (detached) and f(x) [K, b, 1]."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            value = self.f(x)
            (grad,) = torch.autograd.grad(value.sum(), x)
        return grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12), value.detach()

    def transport(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Transport:
        direction, _ = self.direction(x)
        with torch.no_grad():
            return Transport(x - self.eta(x) * direction)
