"""NubOT: unbalanced maps that also predict how much of each cell survives or multiplies.

Lübeck et al. 2022, "Neural unbalanced optimal transport via cycle-consistent semi-couplings",
algorithm 1 and appendix D.3. The unbalanced problem between source mu and target nu is split into
a rescaling and a balanced problem: find weights eta(x), zeta(y) >= 0 such that the proxies
eta mu and zeta nu have equal mass, and the W2 maps T = grad g (forward) and S = grad f (backward)
between them. Per step, with fresh batches x ~ mu, y ~ nu (b cells each):

    e = relative_masses(grad g(x), y)      unbalanced Sinkhorn between T(x) and y (uniform
    z = relative_masses(grad f(y), x)      marginals, cost |.|^2 / its max, eps 0.005, reg_m 0.05):
                                           e_i = b sum_j P_ij / sum P (mean 1); alg. 1 lines 5-8
    J = mean_i e_i [f(T(x_i)) - <x_i, T(x_i)>] - mean_j z_j f(y_j)           (line 9)
    g minimises J + lambda sum_i ||relu(-W^g_i)||_F^2;  f maximises J, then W^f_i <- max(W^f_i, 0)
    eta, zeta minimise MSE(eta(x), e), MSE(zeta(y), z)                    (lines 10-12)

g and f are updated simultaneously from the same J (f's gradient is taken with T(x) from before
g's update). Prediction: T(x) = grad g(x) with weight w(x) = eta(x) / zeta(T(x)).

Why the product: the unbalanced plan's mass on a pair of matching clusters of proportions p
(source) and q (target) is ~ (pq)^{(eps + reg_m) / (eps + 2 reg_m)}, so e alone is about
sqrt(q / p) and z about sqrt(p / q); their ratio is q / p, the cluster's growth factor.

Networks: f, g ICNNs (engine.nn.icnn, 4 x 64) started at 0.5 |x|^2 (identity init, CondOT), so
grad g(x) ~ x and grad f(y) ~ y at step 0; eta, zeta MLPs [64, 64], ReLU, Softplus output. Adam:
f, g lr 1e-4, betas (0.5, 0.9), halved every 3300 steps; eta, zeta lr 1e-3, betas (0.5, 0.9);
10k steps (`published_steps`).

Logged per map: loss_g, loss_f, loss_eta, loss_zeta, w2_estimate (J + 0.5 (mean e|x|^2 +
mean z|y|^2): the weighted dual's W2 value) and transport_cost = mean_i e_i |T(x_i) - x_i|^2
divided by the batch's max |x_i - y_j|^2. Divergence guard: a map whose transport_cost exceeds
`max_transport_cost` has exploded; its transport_cost is logged as inf, which makes the training
loop restore its best state and freeze it (engine.train.loop), as a NaN loss does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.metrics.distances import squared_distances
from engine.nn.icnn import StackedICNN
from engine.nn.lipschitz import StackedMLP
from engine.options import DataError
from engine.ot.sinkhorn import MAX_ITERATIONS, NUBOT_EPS, NUBOT_REG_M, unbalanced_sinkhorn
from engine.solvers.base import Phase, Plan, StackSolver, Transport
from engine.solvers.optim import adam_step
from engine.train.stack_data import StackData

MIN_ZETA = 1e-6  # floor of zeta(T(x)) in the predicted weight eta / zeta (softplus can be ~0)


@dataclass
class NubOTConfig:
    hidden: tuple[int, ...] = (64, 64, 64, 64)  # f, g ICNN widths
    negative_slope: float = 0.2  # ICNN LeakyReLU (as CellOT's ICNNs; the paper says ReLU)
    init_scale: float = 0.01  # ICNN input weights U[-s, s] around the identity start
    weight_hidden: tuple[int, ...] = (64, 64)  # eta, zeta MLP widths (the paper: 32 on its 2-D data)
    lr: float = 1e-4  # f, g
    betas: tuple[float, float] = (0.5, 0.9)
    lr_decay: float = 0.5  # f, g lr multiplied by this every lr_decay_every steps
    lr_decay_every: int = 3300
    weight_lr: float = 1e-3  # eta, zeta
    weight_betas: tuple[float, float] = (0.5, 0.9)
    penalty: float = 1.0  # lambda of the squared penalty on g's negative weights
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
            "f": torch.optim.Adam(self.f.parameters(), lr=c.lr, betas=c.betas, fused=True),
            "g": torch.optim.Adam(self.g.parameters(), lr=c.lr, betas=c.betas, fused=True),
            "weights": torch.optim.Adam([*self.eta.parameters(), *self.zeta.parameters()], lr=c.weight_lr,
                                        betas=c.weight_betas, fused=True),
        }

    def build_schedulers(self, plan: Plan) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """Step decay of f's and g's lr (x lr_decay every lr_decay_every steps)."""
        c = self.config
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
        e = self.relative_masses(self.g.gradient(x), y)
        z = self.relative_masses(self.f.gradient(y), x)
        x = x.requires_grad_(True)
        moved = self.g.gradient(x, create_graph=True)
        dual_x = self.f(moved).squeeze(-1) - (x * moved).sum(-1)
        loss_g = (dual_x * e).mean(1)
        adam_step(self.optimizers["g"], loss_g + self.config.penalty * self.g.negative_weight_penalty(squared=True))
        moved = moved.detach()
        f_y = (self.f(y).squeeze(-1) * z).mean(1)
        loss_f = f_y - (self.f(moved).squeeze(-1) * e).mean(1)
        adam_step(self.optimizers["f"], loss_f)
        self.f.clamp_hidden_weights()
        loss_eta = (self.eta(x.detach()).squeeze(-1) - e).square().mean(1)
        loss_zeta = (self.zeta(y).squeeze(-1) - z).square().mean(1)
        adam_step(self.optimizers["weights"], loss_eta + loss_zeta)
        for scheduler in self.schedulers.values():
            scheduler.step()
        with torch.no_grad():
            x = x.detach()
            w2 = loss_g.detach() - f_y + 0.5 * ((x * x).sum(-1) * e).mean(1) + 0.5 * ((y * y).sum(-1) * z).mean(1)
            scale = squared_distances(x, y).amax((1, 2)).clamp_min(torch.finfo(x.dtype).tiny)
            cost = ((moved - x).square().sum(-1) * e).mean(1) / scale
            cost = torch.where(cost > self.config.max_transport_cost, torch.full_like(cost, float("inf")), cost)
        return {"loss_g": loss_g.detach(), "loss_f": loss_f.detach(), "loss_eta": loss_eta.detach(),
                "loss_zeta": loss_zeta.detach(), "w2_estimate": w2, "transport_cost": cost}

    def transport(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Transport:
        """T(x) = grad g(x) [K, n, d] and the weight eta(x) / zeta(T(x)) [K, n]."""
        moved = self.g.gradient(x).detach()
        with torch.no_grad():
            weights = self.eta(x).squeeze(-1) / self.zeta(moved).squeeze(-1).clamp_min(MIN_ZETA)
        return Transport(moved, weights)
