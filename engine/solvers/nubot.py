"""NubOT: unbalanced maps that also predict how much of each cell survives or multiplies.

Lübeck et al. 2022, "Neural unbalanced optimal transport via cycle-consistent semi-couplings",
algorithm 1 and appendix D.3. The unbalanced problem between source mu and target nu is split into
a rescaling and a balanced problem: find weights eta(x), zeta(y) >= 0 such that the proxies
eta mu and zeta nu have equal mass, and the W2 maps T = grad g (forward) and S (backward) between
them. Per step, with fresh batches x ~ mu, y ~ nu (b cells each):

    e = relative_masses(T(x), y)      unbalanced Sinkhorn between T(x) and y (uniform marginals,
    z = relative_masses(S(y), x)      cost |.|^2 / its max, eps 0.005, reg_m 0.05):
                                      e_i = b sum_j P_ij / sum P (mean 1); alg. 1 lines 5-8
    eta, zeta minimise MSE(eta(x), e), MSE(zeta(y), z)                    (lines 10-11)

and g, f take one step on the balanced W2 dual between e mu and z nu (`dual`):

- "amortized" (default; Amos 2023, as CellOT's default in engine.solvers.cellot): S(y) = x*(y),
  the argmax of g*(y) = max_x <x, y> - g(x), predicted by grad f(y) and fine-tuned
  (engine.ot.conjugate), so S is T's inverse up to the fine-tuning and
      loss_g = mean_i e_i g(x_i) - mean_j z_j g(x*(y_j))    then clamp W^g_i <- max(W^g_i, 0)
      loss_f = mean_j |grad f(y_j) - x*(y_j)|^2
- "minmax" (the paper's loop, `--published`; Makkuva et al. 2020): S = grad f and
      J = mean_i e_i [f(T(x_i)) - <x_i, T(x_i)>] - mean_j z_j f(y_j)        (line 9)
  g minimises J + lambda sum_i ||relu(-W^g_i)||_F^2, then f maximises J (with T(x) from before
  g's update), then W^f_i <- max(W^f_i, 0); both at the same frequency (appendix D.3).

Why the default is not the paper's loop (the paper's synthetic experiment, tests/test_nubot.py;
three 2-D clusters, batches of 400): the min-max finds the right clusters within 250 steps and then
wanders (at lr 1e-4, setting b's cluster weights went (0.30, 1.47, 1.15) at step 250, (0.04, 2.75,
0.01) at 500, (3.21, 0.01, 0.00) at 1500 against the truth (2.1, 0.6, 0.3)); the weights follow
every excursion of the map because e is computed from it. With 10 g-steps per f-step it stays on
the right clusters but after 2000 g-steps its backward map grad f is still off by a third of the
shift, so z and the weights are biased (setting a (0.96, 1.87, 0.28) against (1.35, 1.35, 0.30)).
The amortised dual's backward map is g's exact inverse; its weights are within 0.1 by step 150.

Prediction: T(x) = grad g(x) with weight w(x) = eta(x) / zeta(T(x)).

Why the product: the unbalanced plan's mass on a pair of matching clusters of proportions p
(source) and q (target) is ~ (pq)^{(eps + reg_m) / (eps + 2 reg_m)}, so e alone is about
sqrt(q / p) and z about sqrt(p / q); their ratio is q / p, the cluster's growth factor.

Networks: f, g ICNNs (engine.nn.icnn, 4 x 64) started at 0.5 |x|^2 (identity init, CondOT), so
grad g(x) ~ x and grad f(y) ~ y at step 0; eta, zeta MLPs [64, 64], ReLU, Softplus output.
Default: Adam lr 1e-3 for f, g (their start's gate 1e-4), 1e-3 for eta, zeta, betas (0.5, 0.9), all
three cosine-annealed to 1% over the plan. `NubOT.published`: min-max, f, g lr 1e-4 halved every
3300 steps, eta, zeta 1e-3 constant; 10k steps (`published_steps`).

Logged per map: loss_g, loss_f, loss_eta, loss_zeta, w2_estimate (0.5 W2^2 between e mu and z nu,
from the dual), conjugate_residual (amortized) and transport_cost = mean_i e_i |T(x_i) - x_i|^2
divided by the batch's max |x_i - y_j|^2. Divergence guard: a map whose transport_cost exceeds
`max_transport_cost` has exploded; its transport_cost is logged as inf, which makes the training
loop restore its best state and freeze it (engine.train.loop), as a NaN loss does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from engine.metrics.distances import squared_distances
from engine.nn.icnn import StackedICNN
from engine.nn.lipschitz import StackedMLP
from engine.options import DataError
from engine.ot.conjugate import fine_tune_conjugate
from engine.ot.sinkhorn import MAX_ITERATIONS, NUBOT_EPS, NUBOT_REG_M, unbalanced_sinkhorn
from engine.solvers.base import Phase, Plan, StackSolver, Transport
from engine.solvers.optim import adam_step, cosine_schedule, potential_adam
from engine.train.stack_data import StackData

Dual = Literal["amortized", "minmax"]
Schedule = Literal["cosine", "step"]
MIN_ZETA = 1e-6  # floor of zeta(T(x)) in the predicted weight eta / zeta (softplus can be ~0)


@dataclass
class NubOTConfig:
    hidden: tuple[int, ...] = (64, 64, 64, 64)  # f, g ICNN widths
    negative_slope: float = 0.2  # ICNN LeakyReLU (as CellOT's ICNNs; the paper says ReLU)
    init_scale: float = 0.01  # ICNN input weights U[-s, s] around the identity start
    weight_hidden: tuple[int, ...] = (64, 64)  # eta, zeta MLP widths (the paper: 32 on its 2-D data)
    dual: Dual = "amortized"  # amortized (Amos 2023, as CellOT's default) | minmax (the paper's loop)
    lr: float = 1e-3  # f, g (published: 1e-4)
    gate_lr: float = 1e-4  # the gate on f's and g's quadratic start
    betas: tuple[float, float] = (0.5, 0.9)
    lr_schedule: Schedule = "cosine"  # cosine: every lr -> lr * final_lr_fraction over the plan; step: published
    final_lr_fraction: float = 0.01
    lr_decay: float = 0.5  # step: f, g lr multiplied by this every lr_decay_every steps
    lr_decay_every: int = 3300
    weight_lr: float = 1e-3  # eta, zeta
    weight_betas: tuple[float, float] = (0.5, 0.9)
    conjugate_steps: int = 10  # amortized: fine-tuning steps of the conjugate per step
    penalty: float = 1.0  # minmax: lambda of the squared penalty on g's negative weights
    eps: float = NUBOT_EPS  # unbalanced Sinkhorn: entropic regularisation (cost scaled to max 1)
    reg_m: float = NUBOT_REG_M  # unbalanced Sinkhorn: marginal relaxation
    sinkhorn_iterations: int = MAX_ITERATIONS
    max_transport_cost: float = 10.0  # divergence guard (transport_cost, scaled as logged)

    def __post_init__(self) -> None:
        if self.eps <= 0 or self.reg_m <= 0:
            raise DataError(f"solver.eps and solver.reg_m must be > 0, got {self.eps} and {self.reg_m}")
        if self.lr_decay_every < 1 or not 0 < self.lr_decay <= 1:
            raise DataError(f"solver.lr_decay_every must be >= 1 and solver.lr_decay in (0, 1], got "
                            f"{self.lr_decay_every} and {self.lr_decay}")


class NubOT(StackSolver):
    """Unbalanced W2 maps T = grad g with a weight per cell eta(x) / zeta(T(x)) (NubOT, Lübeck et al. 2022)."""

    name = "nubot"
    Config = NubOTConfig
    published_steps = 10_000
    published: ClassVar[dict[str, object]] = {"dual": "minmax", "lr": 1e-4, "lr_schedule": "step"}

    def __init__(self, n_maps: int, dim: int, config: NubOTConfig, context_dim: int = 0) -> None:
        super().__init__(n_maps, dim, config, context_dim)
        self.f = StackedICNN(n_maps, dim, config.hidden, config.negative_slope, quadratic=True)
        self.g = StackedICNN(n_maps, dim, config.hidden, config.negative_slope, quadratic=True)
        self.eta = StackedMLP(n_maps, dim, config.weight_hidden, "softplus", negative_slope=0.0)
        self.zeta = StackedMLP(n_maps, dim, config.weight_hidden, "softplus", negative_slope=0.0)

    def init_map(self, k: int, generator: torch.Generator) -> None:
        for net in (self.f, self.g):
            net.init_map(k, generator, "identity", self.config.init_scale)
        for net in (self.eta, self.zeta):
            net.init_map(k, generator)

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        return {
            "f": potential_adam(self.f, c.lr, c.gate_lr, c.betas),
            "g": potential_adam(self.g, c.lr, c.gate_lr, c.betas),
            "weights": torch.optim.Adam([*self.eta.parameters(), *self.zeta.parameters()], lr=c.weight_lr,
                                        betas=c.weight_betas, fused=True),
        }

    def build_schedulers(self, plan: Plan) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """cosine: every optimizer over the plan; step: f's and g's lr x lr_decay every lr_decay_every steps."""
        c = self.config
        if c.lr_schedule == "cosine":
            return {name: cosine_schedule(opt, plan.total, c.final_lr_fraction) for name, opt in self.optimizers.items()}
        return {name: torch.optim.lr_scheduler.StepLR(self.optimizers[name], c.lr_decay_every, c.lr_decay)
                for name in ("f", "g")}

    def relative_masses(self, moved: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """e_i = b sum_j P_ij / sum_ij P_ij [K, b] for the unbalanced plan P between moved [K, b, d]
        and other [K, m, d], uniform marginals, cost |moved_i - other_j|^2 / its max per map."""
        cost = squared_distances(moved, other)
        cost = cost / cost.amax((1, 2), keepdim=True).clamp_min(torch.finfo(cost.dtype).tiny)
        c = self.config
        rows = unbalanced_sinkhorn(cost, c.eps, c.reg_m, max_iterations=c.sinkhorn_iterations).sum(2)
        return rows * (moved.shape[1] / rows.sum(1, keepdim=True))

    def train_step(self, data: StackData, step: int, phase: Phase) -> dict[str, torch.Tensor]:
        x, y = data.source_batch(), data.target_batch()
        moved = self.g.gradient(x)  # no graph: create_graph=False
        e = self.relative_masses(moved, y)
        logs = self._amortized_step(x, y, e) if self.config.dual == "amortized" else self._minmax_step(x, y, e)
        loss_eta = (self.eta(x).squeeze(-1) - e).square().mean(1)
        loss_zeta = (self.zeta(y).squeeze(-1) - logs.pop("z")).square().mean(1)
        adam_step(self.optimizers["weights"], loss_eta + loss_zeta)
        for scheduler in self.schedulers.values():
            scheduler.step()
        with torch.no_grad():
            scale = squared_distances(x, y).amax((1, 2)).clamp_min(torch.finfo(x.dtype).tiny)
            cost = ((moved - x).square().sum(-1) * e).mean(1) / scale
            cost = torch.where(cost > self.config.max_transport_cost, torch.full_like(cost, float("inf")), cost)
        return {**logs, "loss_eta": loss_eta.detach(), "loss_zeta": loss_zeta.detach(), "transport_cost": cost}

    def _amortized_step(self, x: torch.Tensor, y: torch.Tensor, e: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step on the weighted dual with S(y) = x*(y), g's fine-tuned conjugate argmax; returns z too."""
        preconditioner = self.g.quadratic.inverse_hessian()
        conjugate = fine_tune_conjugate(self.g, y, self.f.gradient(y), self.config.conjugate_steps, preconditioner)
        z = self.relative_masses(conjugate.points, x)
        g_x = (self.g(x).squeeze(-1) * e).mean(1)
        loss_g = g_x - (self.g(conjugate.points).squeeze(-1) * z).mean(1)
        adam_step(self.optimizers["g"], loss_g)
        self.g.clamp_hidden_weights()
        loss_f = (self.f.gradient(y, create_graph=True) - conjugate.points).square().sum(-1).mean(1)
        adam_step(self.optimizers["f"], loss_f)
        with torch.no_grad():
            w2 = 0.5 * (((x * x).sum(-1) * e).mean(1) + ((y * y).sum(-1) * z).mean(1)) - g_x.detach() \
                - (conjugate.values * z).mean(1)
        return {"loss_g": loss_g.detach(), "loss_f": loss_f.detach(), "w2_estimate": w2,
                "conjugate_residual": conjugate.residual, "z": z}

    def _minmax_step(self, x: torch.Tensor, y: torch.Tensor, e: torch.Tensor) -> dict[str, torch.Tensor]:
        """The paper's alternating step on J (algorithm 1, line 9) with S = grad f; returns z too."""
        z = self.relative_masses(self.f.gradient(y), x)
        x = x.clone().requires_grad_(True)
        moved = self.g.gradient(x, create_graph=True)
        loss_g = ((self.f(moved).squeeze(-1) - (x * moved).sum(-1)) * e).mean(1)
        adam_step(self.optimizers["g"], loss_g + self.config.penalty * self.g.negative_weight_penalty(squared=True))
        moved = moved.detach()
        f_y = (self.f(y).squeeze(-1) * z).mean(1)
        loss_f = f_y - (self.f(moved).squeeze(-1) * e).mean(1)
        adam_step(self.optimizers["f"], loss_f)
        self.f.clamp_hidden_weights()
        with torch.no_grad():
            x = x.detach()
            w2 = loss_g.detach() - f_y + 0.5 * (((x * x).sum(-1) * e).mean(1) + ((y * y).sum(-1) * z).mean(1))
        return {"loss_g": loss_g.detach(), "loss_f": loss_f.detach(), "w2_estimate": w2, "z": z}

    def transport(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Transport:
        """T(x) = grad g(x) [K, n, d] and the weight eta(x) / zeta(T(x)) [K, n]."""
        moved = self.g.gradient(x)  # no graph: create_graph=False
        with torch.no_grad():
            weights = self.eta(x).squeeze(-1) / self.zeta(moved).squeeze(-1).clamp_min(MIN_ZETA)
        return Transport(moved, weights)
