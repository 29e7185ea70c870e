"""A deep-set combinator of context tokens (Zaheer et al. 2017), CondOT's C_Phi (Bunne et al. 2022, App. E.3.2).

A context c [q] is read as a weighted set of tokens: entry i is token e_i (the i-th unit vector)
with weight c_i, present when c_i != 0. With one-hot embeddings the tokens of "A+B" are A and B (and,
with a group key, the group). The combinator is permutation-invariant:

    C(c) = sigmoid(dec(pool_{i: c_i != 0} c_i enc(e_i)))

enc: q -> 8 -> 8 (LeakyReLU between, linear output), pool: sum or max, dec: 8 -> 8 -> q (LeakyReLU
between), so the set embedding has the size of each input embedding, in (0, 1) (the paper's sizes).
Every parameter keeps the leading model axis M (engine.nn.stacked).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from engine.nn.stacked import StackedLinear

Pool = Literal["sum", "max"]
WIDTH = 8  # hidden units of enc and dec (the paper)
START_SCALE = 2.0  # dec's output scale at the start: sigmoid(2) - 1/2 = 0.38 per present token


class DeepSet(nn.Module):
    """M deep sets over the q tokens of a context (module docstring)."""

    def __init__(self, n_models: int, context_dim: int, pool: Pool = "sum", width: int = WIDTH) -> None:
        super().__init__()
        if pool not in ("sum", "max"):
            raise ValueError(f"pool must be 'sum' or 'max', got {pool!r}")
        self.pool = pool
        self.encoder = nn.ModuleList([StackedLinear(n_models, context_dim, width), StackedLinear(n_models, width, width)])
        self.decoder = nn.ModuleList([StackedLinear(n_models, width, width), StackedLinear(n_models, width, context_dim)])

    @torch.no_grad()
    def init_model(self, m: int, generator: torch.Generator, scale: float = START_SCALE) -> None:
        """Model m starts as the additive combinator up to an affine map: token codes E [q, width]
        (rows of the identity when q <= width, else random non-negative unit rows), enc(e_i) = E_i
        (W1 = E, W2 = I), dec(h) = scale h E^T (W3 = I, W4 = scale E^T), biases 0. The codes are
        non-negative, so every LeakyReLU is linear there, and for q <= width a 0/1 multi-hot c gives
        C(c) = 1/2 + (sigmoid(scale) - 1/2) c with either pool: the geometry of `sum`'s contexts, so
        CondOT's softmax start is the same as with the sum combinator; training moves it from there."""
        q, width = self.encoder[0].weight.shape[1:]
        if q <= width:
            codes = torch.eye(q, width)
        else:
            codes = torch.rand(q, width, generator=generator)
            codes /= codes.norm(dim=1, keepdim=True)
        identity = torch.eye(width)
        for layer, weight in zip((*self.encoder, *self.decoder), (codes, identity, identity, scale * codes.T)):
            layer.weight[m].copy_(weight)
            layer.bias[m].zero_()

    @staticmethod
    def _mlp(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        return layers[1](F.leaky_relu(layers[0](x), 0.2))

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """Set embeddings [M, n, q] of contexts [M, n, q]."""
        m, q = context.shape[0], context.shape[-1]
        tokens = self._mlp(self.encoder, torch.eye(q, dtype=context.dtype, device=context.device).expand(m, q, q))
        if self.pool == "sum":
            pooled = context @ tokens  # [M, n, width]: sum_i c_i enc(e_i)
        else:
            weighted = context.unsqueeze(-1) * tokens.unsqueeze(1)  # [M, n, q, width]
            present = (context != 0).unsqueeze(-1)
            pooled = weighted.masked_fill(~present, float("-inf")).amax(-2)
        return torch.sigmoid(self._mlp(self.decoder, pooled))
