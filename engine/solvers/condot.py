"""CondOT: one conditional W2 map T(x, c) = grad_x g(x, c) for every context c (Bunne et al. 2022).

g and f are partially input-convex networks (engine.nn.picnn): convex in the cells x, not in the
context c (an embedded dose, perturbation, combination or covariate; engine.data.contexts). One
model serves all contexts, so it predicts contexts it never saw through their embedding.

Initialisation (the paper's contribution, Sec. 4): the modulator u_0(c) = softmax over the J
training contexts, and one quadratic potential per training context, the identity (`init:
identity`) or the Bures map between Gaussian fits of that context's source and target (`init:
gaussian`); f starts at the inverse maps. At step 0, grad_x g(., c_j) is then the Bures map of
training context j (up to the softmax's leak onto the other contexts, e^-sharpness at most).

Combinator (`combinator`): a context is used as it is (`sum`: multi-hot contexts are already the
sum of their parts' one-hots, the paper's C+), or through a deep set over its tokens shared by f and
g (`deepset`, engine.nn.deepset; `pool` sum or max), trained with g's optimizer. The softmax then
starts over the deep set's initial embeddings of the training contexts; convexity in x is untouched.

Training: CellOT's min-max (Makkuva et al. 2020), as the paper. Each outer step draws
`contexts_per_step` training contexts (the paper: 1; 0 = all), a target batch y of each, then
`inner_steps` g-steps on fresh source batches x of the same contexts,
    loss_g = mean[f(T(x, c), c) - <x, T(x, c)>] + lambda sum_k ||relu(-W^z_k(g))||_F,
then one f-step, loss_f = mean f(y, c) - mean f(T(x, c), c), and the clamp W^z_k(f) <- max(., 0).
Adam 1e-4, betas (0.5, 0.9), batch 256 per context (train.batch_size; with data-parallel workers,
the global batch, each worker drawing its share and the gradients averaged: StackSolver.average). The contexts of a step are a
hash of (the model's draw seed, step), so a resumed run draws the same ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from engine.nn.deepset import DeepSet, Pool
from engine.nn.picnn import StackedPICNN
from engine.ot.gaussian import COVARIANCE_RIDGE, bures_map
from engine.solvers.base import Phase, StackSolver, Transport
from engine.solvers.optim import adam_step
from engine.train.stack_data import Batch, StackData, mix32

CondInit = Literal["gaussian", "identity"]
Combinator = Literal["sum", "deepset"]
CHUNK_ELEMENTS = 1 << 24  # cells x quadratics x dim per transport chunk (bounds the memory of z_0)


@dataclass
class CondOTConfig:
    hidden: tuple[int, ...] = (64, 64, 64, 64)
    negative_slope: float = 0.2
    init: CondInit = "gaussian"  # gaussian (Bures map per training context) | identity
    init_scale: float = 0.01  # W^xu ~ U[-s, s]; every other weight starts at its set value
    sharpness: float = 10.0  # u_0(c) = softmax(-beta |c - c_j|^2), beta = sharpness / min_ij |c_i - c_j|^2
    covariance_ridge: float = COVARIANCE_RIDGE
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    inner_steps: int = 10  # g-steps per f-step
    penalty: float = 1.0  # lambda of the penalty on g's negative W^z
    contexts_per_step: int = 1  # training contexts drawn per outer step (the paper: 1; 0 = all)
    combinator: Combinator = "sum"  # sum: contexts as given (multi-hot sums) | deepset: a deep set of their tokens
    pool: Pool = "sum"  # the deep set's pooling: sum | max


class CondOT(StackSolver):
    """Conditional W2 map over all contexts: partially input-convex potentials, min-max, Gaussian init per context."""

    name = "condot"
    Config = CondOTConfig
    shared = True

    def __init__(self, n_maps: int, dim: int, config: CondOTConfig, context_dim: int = 0) -> None:
        super().__init__(n_maps, dim, config, context_dim)
        if context_dim < 1:
            raise ValueError("condot needs a context per map (context_dim >= 1)")
        if config.contexts_per_step < 0 or config.inner_steps < 1 or config.sharpness <= 0:
            raise ValueError("condot needs contexts_per_step >= 0, inner_steps >= 1 and sharpness > 0")
        self.f = StackedPICNN(1, dim, context_dim, n_maps, config.hidden, config.negative_slope)
        self.g = StackedPICNN(1, dim, context_dim, n_maps, config.hidden, config.negative_slope)
        self.combinator = DeepSet(1, context_dim, config.pool) if config.combinator == "deepset" else None
        self.register_buffer("draw_seed", torch.zeros((), dtype=torch.int64))

    def embed(self, context: torch.Tensor) -> torch.Tensor:
        """The context the potentials read [1, n, q]: as given, or its deep-set embedding."""
        return context if self.combinator is None else self.combinator(context)

    @torch.no_grad()
    def init_map(self, k: int, generator: torch.Generator) -> None:
        for net in (self.f, self.g):
            net.init_map(0, generator, self.config.init_scale)
        if self.combinator is not None:
            self.combinator.init_model(0, generator)
        self.draw_seed.fill_(int(torch.randint(0, 2**31 - 1, (), generator=generator)))

    @torch.no_grad()
    def init_from_data(self, data: StackData) -> None:
        """u_0 over the training contexts; the Bures map of each context in g, its inverse in f."""
        if data.contexts is None or data.n_maps != self.n_maps:
            raise ValueError(f"condot was built for {self.n_maps} training contexts; the data have "
                             f"{data.n_maps} maps and {'no' if data.contexts is None else 'their'} contexts")
        contexts = self.embed(data.contexts.detach().cpu().unsqueeze(0))[0]
        for net in (self.f, self.g):
            net.set_contexts(contexts.double(), self.config.sharpness)
        if self.config.init == "gaussian":
            mean_s, cov_s, mean_t, cov_t = data.moments(self.config.covariance_ridge)
            self.g.set_affine(*(t.cpu() for t in bures_map(mean_s, cov_s, mean_t, cov_t)))
            self.f.set_affine(*(t.cpu() for t in bures_map(mean_t, cov_t, mean_s, cov_s)))

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        g_params = [*self.g.parameters(), *(() if self.combinator is None else self.combinator.parameters())]
        return {name: torch.optim.Adam(params, lr=c.lr, betas=c.betas, fused=True)
                for name, params in (("f", list(self.f.parameters())), ("g", g_params))}

    def _contexts_of_step(self, step: int) -> torch.Tensor:
        """Indices of the training contexts drawn at `step` (all when contexts_per_step is 0 or >= K)."""
        n = self.config.contexts_per_step
        everything = torch.arange(self.n_maps, device=self.draw_seed.device)
        if n == 0 or n >= self.n_maps:
            return everything
        keys = mix32(mix32(self.draw_seed ^ (step & 0x7FFFFFFF)) ^ everything)
        return torch.argsort(keys)[:n]

    def _flat(self, batch: Batch, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen contexts' cells and embedded per-cell contexts as one model's batch: [1, m b, d], [1, m b, q]."""
        cells, context = batch.cells[chosen], batch.context[chosen]
        return cells.reshape(1, -1, cells.shape[-1]), self.embed(context.reshape(1, -1, context.shape[-1]))

    def train_step(self, data: StackData, step: int, phase: Phase) -> dict[str, torch.Tensor]:
        chosen = self._contexts_of_step(step)
        y, c_y = self._flat(data.target_sample(), chosen)
        for _ in range(self.config.inner_steps):
            x, c_x = self._flat(data.source_sample(), chosen)
            x.requires_grad_(True)
            t = self.g.gradient(x, c_x, create_graph=True)
            loss_g = (self.f(t, c_x) - (x * t).sum(-1, keepdim=True)).mean((1, 2))
            adam_step(self.optimizers["g"], loss_g + self.config.penalty * self.g.negative_weight_penalty(), self.average)
        x, c_x = self._flat(data.source_sample(), chosen)
        t = self.g.gradient(x, c_x)
        f_t, f_y = self.f(t, c_x).mean((1, 2)), self.f(y, c_y).mean((1, 2))
        adam_step(self.optimizers["f"], f_y - f_t, self.average)
        self.f.clamp_hidden_weights()
        with torch.no_grad():
            w2 = f_t - (x * t).sum(-1).mean(1) - f_y + 0.5 * ((x * x).sum(-1).mean(1) + (y * y).sum(-1).mean(1))
        logs = {"loss_g": loss_g.detach(), "loss_f": (f_y - f_t).detach(), "w2_estimate": w2}
        if self.average is not None:  # data parallel: the global batch's values on every worker
            self.average(list(logs.values()))
        return logs

    def transport(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Transport:
        """x [K, n, d] with one context per map [K, c] (any K: seen or unseen contexts)."""
        if context is None:
            raise ValueError("condot needs a context per map to transport cells")
        k, n, d = x.shape
        cells = x.reshape(1, k * n, d)
        with torch.no_grad():
            embedded = self.embed(context.to(x).unsqueeze(0))[0]
        contexts = embedded.unsqueeze(1).expand(k, n, -1).reshape(1, k * n, -1)
        chunk = max(1, CHUNK_ELEMENTS // (self.n_maps * d))
        moved = [self.g.gradient(cells[:, i : i + chunk], contexts[:, i : i + chunk]).detach()
                 for i in range(0, k * n, chunk)]
        return Transport(torch.cat(moved, 1).reshape(k, n, d))
