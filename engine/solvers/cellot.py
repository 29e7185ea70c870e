"""CellOT: W2 optimal transport with two ICNN potentials trained min-max.

Makkuva et al. 2020, as used by CellOT (Bunne et al., Nature Methods 2023). With convex f, g and
T(x) = grad g(x), the dual objective is
    min_f max_g  E_y[f(y)] - E_x[f(T(x)) - <x, T(x)>].
Each outer step: `inner_steps` g-steps on fresh source batches,
    loss_g = mean[f(T(x)) - <x, T(x)>] + lambda * sum_i ||relu(-W^g_i)||_F,
then one f-step with loss_f = mean[f(y)] - mean[f(T(x))] and the clamp W^f_i <- max(W^f_i, 0).
Logged W2 estimate: mean[f(T(x)) - <x, T(x)> - f(y) + 0.5 (|x|^2 + |y|^2)].
Defaults are the published constants (SOLVERS.md) except `init`: the Gaussian (Bures) start of
CondOT (Bunne et al. 2022); `init="uniform"` is CellOT's exact initialisation.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from engine.nn.icnn import Init, StackedICNN
from engine.ot.gaussian import COVARIANCE_RIDGE, bures_map
from engine.solvers.base import Phase, StackSolver, Transport
from engine.train.stack_data import StackData


@dataclass
class CellOTConfig:
    hidden: tuple[int, ...] = (64, 64, 64, 64)
    negative_slope: float = 0.2
    init: Init = "gaussian"  # gaussian | identity | uniform (CellOT's exact init)
    init_scale: float = 0.1  # uniform: U[0, s]; identity/gaussian: input weights U[-s/10, s/10]
    covariance_ridge: float = COVARIANCE_RIDGE
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    inner_steps: int = 10
    penalty: float = 1.0


class CellOT(StackSolver):
    """W2 maps T = grad g: two input-convex networks trained min-max (Makkuva et al. 2020, CellOT)."""

    name = "cellot"
    Config = CellOTConfig
    published_steps = 100_000

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
        return {
            "f": torch.optim.Adam(self.f.parameters(), lr=c.lr, betas=c.betas, fused=True),
            "g": torch.optim.Adam(self.g.parameters(), lr=c.lr, betas=c.betas, fused=True),
        }

    @staticmethod
    def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """One Adam step on the sum of per-map losses (maps share no parameter, so they stay independent)."""
        params = optimizer.param_groups[0]["params"]
        # allow_unused: the output bias of g never reaches grad g (its .grad stays None, as with .backward())
        for p, grad in zip(params, torch.autograd.grad(loss.sum(), params, allow_unused=True)):
            p.grad = grad
        optimizer.step()

    def train_step(self, data: StackData, step: int, phase: Phase) -> dict[str, torch.Tensor]:
        y = data.target_batch()
        for _ in range(self.config.inner_steps):
            x = data.source_batch().requires_grad_(True)
            t = self.g.gradient(x, create_graph=True)
            loss_g = (self.f(t) - (x * t).sum(-1, keepdim=True)).mean((1, 2))
            self._step(self.optimizers["g"], loss_g + self.config.penalty * self.g.negative_weight_penalty())
        x = data.source_batch()
        t = self.g.gradient(x)
        f_t, f_y = self.f(t).mean((1, 2)), self.f(y).mean((1, 2))
        self._step(self.optimizers["f"], f_y - f_t)
        self.f.clamp_hidden_weights()
        with torch.no_grad():
            dual = f_t - (x * t).sum(-1).mean(1)
            w2 = dual - f_y + 0.5 * ((x * x).sum(-1).mean(1) + (y * y).sum(-1).mean(1))
        return {"loss_g": loss_g.detach(), "loss_f": (f_y - f_t).detach(), "w2_estimate": w2}

    def transport(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Transport:
        return Transport(self.g.gradient(x).detach())
