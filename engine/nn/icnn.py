"""Input-convex neural networks (Amos et al. 2017) in the form CellOT uses (Makkuva et al. 2020).

    z_1     = leaky(A_0 x)^2
    z_{i+1} = leaky(W_i z_i + A_i x)            i = 1 .. L-1
    f(x)    = W_L z_L + A_L x  [+ q(x)]

leaky = LeakyReLU(0.2). f is convex in x when every W_i >= 0 (the squared first layer is convex and
leaky is convex and non-decreasing). The optional quadratic term q (StackedQuadratic) carries the
identity or Gaussian (Bures) initialisation of CondOT. Every layer is stacked over K maps.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from engine.nn.stacked import ConvexPath, StackedLinear, StackedQuadratic

Init = Literal["uniform", "identity", "gaussian"]
INITS: tuple[str, ...] = ("uniform", "identity", "gaussian")


class StackedICNN(ConvexPath):
    """K convex potentials f_k: R^d -> R evaluated together; input [K, b, d], output [K, b, 1]."""

    def __init__(
        self,
        n_maps: int,
        dim: int,
        hidden: tuple[int, ...] = (64, 64, 64, 64),
        negative_slope: float = 0.2,
        quadratic: bool = False,
    ) -> None:
        super().__init__()
        widths = tuple(hidden) + (1,)
        self.negative_slope, self.widths = negative_slope, widths
        # all input ("A") layers read x: one fused GEMM [d, sum(widths)], split afterwards
        self.input_layer = StackedLinear(n_maps, dim, sum(widths), bias=True)
        self.hidden_layers = nn.ModuleList(
            StackedLinear(n_maps, w_in, w_out, bias=False) for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        self.quadratic = StackedQuadratic(n_maps, dim, widths[0]) if quadratic else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = self.input_layer(x).split(self.widths, dim=-1)
        z = F.leaky_relu(inputs[0], self.negative_slope)
        z = z * z
        for hidden, inp in zip(self.hidden_layers[:-1], inputs[1:-1]):
            z = F.leaky_relu(hidden(z) + inp, self.negative_slope)
        out = self.hidden_layers[-1](z) + inputs[-1]
        if self.quadratic is not None:
            out = out + self.quadratic(x)
        return out

    def gradient(self, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """grad_x f(x) per cell, [K, b, d]: the transport map of a potential."""
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self(x).sum(), x, create_graph=create_graph)
        return grad

    @torch.no_grad()
    def init_map(self, k: int, generator: torch.Generator, init: Init, scale: float) -> None:
        """Draw map k's weights from its own generator (so a map's init does not depend on its stack).

        uniform: every weight U[0, scale], input biases 0 (CellOT: scale 0.1).
        identity / gaussian: hidden weights 1/width (layers average), input weights U[-scale, scale]
        near zero, so f starts at its quadratic term (set separately from data moments).
        """
        if init not in INITS:
            raise ValueError(f"unknown ICNN init {init!r}; choose one of {', '.join(INITS)}")
        self.input_layer.weight[k].uniform_(0.0 if init == "uniform" else -scale, scale, generator=generator)
        self.input_layer.bias[k].zero_()
        for layer in self.hidden_layers:
            w = layer.weight[k]
            if init == "uniform":
                w.uniform_(0.0, scale, generator=generator)
            else:
                w.fill_(1.0 / w.shape[0])

    def _hidden_path(self) -> list[torch.Tensor]:
        """The weights that must stay >= 0 for convexity: W_i and the quadratic's gate."""
        weights = [layer.weight for layer in self.hidden_layers]
        return weights + ([self.quadratic.gate] if self.quadratic is not None else [])
