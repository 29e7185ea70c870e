"""CellOT: W2 optimal transport maps T = grad g with input-convex potentials (ICNNs).

Brenier: the W2 map from source mu to target nu is grad g for the convex g minimising the dual
    J(g) = E_mu[g(x)] + E_nu[g*(y)],   g*(y) = max_x <x, y> - g(x),
and 0.5 W2^2 = 0.5 (E|x|^2 + E|y|^2) - J(g). Two networks: g (source side, the map) and f (target
side). Two ways to train them (`dual`):

- "amortized" (default; Amos 2023, "On amortizing convex conjugates for optimal transport"):
  grad f(y) predicts the argmax x*(y) of g*(y) and a few fine-tuning steps make it exact
  (engine.ot.conjugate). Then J is an ordinary minimisation (Danskin):
      loss_g = mean g(x) - mean g(x*(y))           then clamp W^g_i <- max(W^g_i, 0)
      loss_f = mean ||grad f(y) - x*(y)||^2        (regression; f need not be convex)
- "minmax" (published; Makkuva et al. 2020 as used by CellOT, Bunne et al. 2023): g plays the
  conjugate of f and the two are trained min-max. Per outer step `inner_steps` g-steps on fresh
  source batches, loss_g = mean[f(T(x)) - <x, T(x)>] + lambda sum_i ||relu(-W^g_i)||_F, then one
  f-step, loss_f = mean f(y) - mean f(T(x)), and the clamp W^f_i <- max(W^f_i, 0).

Why the default is not the published loop (benchmarks/ground_truth.py, d = 8, 3 known maps far from
affine, 2000 steps): the min-max from the Bures start ends at 0.31-2.0x the Bures map's L2-UVP and
the published loop (uniform init) at 0.40-5.7x; the amortised dual at 0.09-0.36x (under 1% from
step 1250), with 2.6x the outer steps per second. The min-max's f gradient is only as good as g's
inexact conjugate, and each of its outer steps costs 10 g-steps; the amortised dual's gradient is
exact up to the fine-tuning and costs one g-step.

Logged per map: loss_g, loss_f, w2_estimate (0.5 W2^2 from the dual) and, for the amortized dual,
conjugate_residual = mean ||y - grad g(x*(y))|| (0 at the exact conjugate). `CellOT.published` holds
the paper's exact settings (`--published`): minmax, uniform init, Adam 1e-4, no schedule. The
cosine schedule follows the plan's total: resuming with a larger `--steps` restarts it from there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from engine.nn.icnn import Init, StackedICNN
from engine.ot.conjugate import fine_tune_conjugate
from engine.ot.gaussian import COVARIANCE_RIDGE, bures_map
from engine.solvers.base import Phase, Plan, StackSolver, Transport
from engine.solvers.optim import adam_step, cosine_schedule, potential_adam
from engine.train.stack_data import StackData

Dual = Literal["amortized", "minmax"]
Schedule = Literal["cosine", "constant"]


@dataclass
class CellOTConfig:
    hidden: tuple[int, ...] = (64, 64, 64, 64)
    negative_slope: float = 0.2
    dual: Dual = "amortized"  # amortized (Amos 2023) | minmax (CellOT's published loop)
    init: Init = "gaussian"  # gaussian (Bures start, CondOT) | identity | uniform (CellOT's exact init)
    init_scale: float = 0.1  # uniform: U[0, s]; identity/gaussian: input weights U[-s/10, s/10]
    covariance_ridge: float = COVARIANCE_RIDGE
    lr: float = 3e-3  # published: 1e-4
    gate_lr: float = 1e-4  # lr of the gate on the quadratic start (identity/gaussian init)
    lr_schedule: Schedule = "cosine"  # cosine: lr -> lr * final_lr_fraction over the plan; published: constant
    final_lr_fraction: float = 0.01
    betas: tuple[float, float] = (0.5, 0.9)
    conjugate_steps: int = 10  # amortized: fine-tuning steps of the conjugate per outer step
    inner_steps: int = 10  # minmax: g-steps per f-step
    penalty: float = 1.0  # minmax: lambda of the penalty on g's negative weights


class CellOT(StackSolver):
    """W2 maps T = grad g: input-convex potentials, amortised-conjugate dual (default) or CellOT's min-max."""

    name = "cellot"
    Config = CellOTConfig
    published_steps = 100_000
    published: ClassVar[dict[str, object]] = {"dual": "minmax", "init": "uniform", "lr": 1e-4, "lr_schedule": "constant"}

    def __init__(self, n_maps: int, dim: int, config: CellOTConfig, context_dim: int = 0) -> None:
        super().__init__(n_maps, dim, config, context_dim)
        quadratic = config.init != "uniform"
        self.f = StackedICNN(n_maps, dim, config.hidden, config.negative_slope, quadratic)
        self.g = StackedICNN(n_maps, dim, config.hidden, config.negative_slope, quadratic)

    def init_map(self, k: int, generator: torch.Generator) -> None:
        scale = self.config.init_scale if self.config.init == "uniform" else self.config.init_scale / 10
        for net in (self.f, self.g):
            net.init_map(k, generator, self.config.init, scale)

    @torch.no_grad()
    def init_from_data(self, data: StackData) -> None:
        """Gaussian init: g starts at the Bures map source -> target, f at its inverse."""
        if self.config.init != "gaussian":
            return
        mean_s, cov_s, mean_t, cov_t = data.moments(self.config.covariance_ridge)
        for net, (m0, c0, m1, c1) in ((self.g, (mean_s, cov_s, mean_t, cov_t)), (self.f, (mean_t, cov_t, mean_s, cov_s))):
            matrix, shift = bures_map(m0, c0, m1, c1)
            net.quadratic.set_affine(matrix.float().cpu(), shift.float().cpu())

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        return {name: potential_adam(net, c.lr, c.gate_lr, c.betas) for name, net in (("f", self.f), ("g", self.g))}

    def build_schedulers(self, plan: Plan) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """Cosine over the whole plan, down to final_lr_fraction of each lr (or none: constant)."""
        if self.config.lr_schedule == "constant":
            return {}
        return {name: cosine_schedule(opt, plan.total, self.config.final_lr_fraction) for name, opt in self.optimizers.items()}

    def train_step(self, data: StackData, step: int, phase: Phase) -> dict[str, torch.Tensor]:
        logs = self._amortized_step(data) if self.config.dual == "amortized" else self._minmax_step(data)
        for scheduler in self.schedulers.values():
            scheduler.step()
        return logs

    def _amortized_step(self, data: StackData) -> dict[str, torch.Tensor]:
        x, y = data.source_batch(), data.target_batch()
        preconditioner = None if self.g.quadratic is None else self.g.quadratic.inverse_hessian()
        conjugate = fine_tune_conjugate(self.g, y, self.f.gradient(y), self.config.conjugate_steps, preconditioner)
        g_x = self.g(x).mean((1, 2))
        loss_g = g_x - self.g(conjugate.points).mean((1, 2))
        adam_step(self.optimizers["g"], loss_g)
        self.g.clamp_hidden_weights()
        loss_f = (self.f.gradient(y, create_graph=True) - conjugate.points).square().sum(-1).mean(1)
        adam_step(self.optimizers["f"], loss_f)
        with torch.no_grad():
            w2 = 0.5 * ((x * x).sum(-1).mean(1) + (y * y).sum(-1).mean(1)) - g_x - conjugate.values.mean(1)
        return {"loss_g": loss_g.detach(), "loss_f": loss_f.detach(), "w2_estimate": w2,
                "conjugate_residual": conjugate.residual}

    def _minmax_step(self, data: StackData) -> dict[str, torch.Tensor]:
        y = data.target_batch()
        for _ in range(self.config.inner_steps):
            x = data.source_batch().requires_grad_(True)
            t = self.g.gradient(x, create_graph=True)
            loss_g = (self.f(t) - (x * t).sum(-1, keepdim=True)).mean((1, 2))
            adam_step(self.optimizers["g"], loss_g + self.config.penalty * self.g.negative_weight_penalty())
        x = data.source_batch()
        t = self.g.gradient(x)
        f_t, f_y = self.f(t).mean((1, 2)), self.f(y).mean((1, 2))
        adam_step(self.optimizers["f"], f_y - f_t)
        self.f.clamp_hidden_weights()
        with torch.no_grad():
            dual = f_t - (x * t).sum(-1).mean(1)
            w2 = dual - f_y + 0.5 * ((x * x).sum(-1).mean(1) + (y * y).sum(-1).mean(1))
        return {"loss_g": loss_g.detach(), "loss_f": (f_y - f_t).detach(), "w2_estimate": w2}

    def transport(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Transport:
        return Transport(self.g.gradient(x).detach())
