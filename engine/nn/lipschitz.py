"""Stacked 1-Lipschitz networks (Anil et al. 2019) and plain stacked MLPs, map axis first.

A 1-Lipschitz potential f: R^d -> R (W1OT's Kantorovich potential) is a chain of linear layers with
spectral norm <= 1 and the norm-preserving GroupSort activation:

    h_0 = x,   h_l = groupsort(h_{l-1} W_l + b_l)   l = 1 .. L,   f(x) = h_L W_{L+1} + b_{L+1}

||x W|| <= ||x|| when W has orthonormal columns (in >= out, a projection) or orthonormal rows
(in < out, an isometry); GroupSort permutes its input, so |f(x) - f(y)| <= ||x - y||.

Semi-orthogonal weights. Each layer keeps a free parameter P [K, n, p], n = max(in, out),
p = min(in, out), and maps it to Q [K, n, p] with orthonormal columns (Q^T Q = I_p); the layer's
weight [K, in, out] is Q (in >= out) or Q^T (in < out). Two maps P -> Q:

- "cayley" (default; Trockman & Kolter 2021): the Cayley transform Q = (I + A~)^-1 (I - A~) E of the
  n x n skew matrix A~ = [[S, -V^T], [V, 0]] (S = P_top - P_top^T, V = P_bottom, E the first p
  columns), solved by a Schur complement in p x p only: with A = S + V^T V (I + A is invertible:
  its symmetric part is I + V^T V),
      Q = [ (I + A)^-1 (I - A) ;  -2 V (I + A)^-1 ],
  exactly orthonormal up to rounding, at the cost of one p x p solve (p <= 64 here, whatever d).
- "bjorck" (Björck & Bowie 1971; Anil et al. 2019): Q_0 = P / c with c^2 >= ||P||_2^2 (the smaller
  of tr(P^T P) and the row-sum norm of P^T P), then `iterations` first-order steps
  Q <- Q (3/2 I - 1/2 Q^T Q). Each step maps a singular value s to 3/2 s - 1/2 s^3 <= 1 for
  s in [0, 1]: the norm stays <= 1 at every iteration, and the columns converge to orthonormal.

GroupSort(groups): the features split into `groups` groups of equal size, each sorted ascending.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from engine.nn.stacked import StackedLinear

Orthonormalisation = Literal["cayley", "bjorck"]
ORTHONORMALISATIONS: tuple[str, ...] = ("cayley", "bjorck")


def cayley(param: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns Q [K, n, p] from a free P [K, n, p] (n >= p) by the Cayley transform."""
    p = param.shape[-1]
    top, v = param[:, :p], param[:, p:]
    eye = torch.eye(p, dtype=param.dtype, device=param.device)
    a = top - top.transpose(1, 2) + v.transpose(1, 2) @ v
    system = eye + a
    upper = torch.linalg.solve_ex(system, eye - a).result
    lower = -2.0 * torch.linalg.solve_ex(system, v, left=False).result
    return torch.cat((upper, lower), dim=1)


def bjorck(param: torch.Tensor, iterations: int) -> torch.Tensor:
    """Orthonormal columns Q [K, n, p] from P [K, n, p] (n >= p) by first-order Björck iterations."""
    gram = param.transpose(1, 2) @ param
    bound = torch.minimum(torch.diagonal(gram, dim1=1, dim2=2).sum(-1), gram.abs().sum(-1).amax(-1))
    q = param / bound.clamp_min(1e-12).sqrt().view(-1, 1, 1)
    eye = torch.eye(param.shape[-1], dtype=param.dtype, device=param.device)
    for _ in range(iterations):
        q = q @ (1.5 * eye - 0.5 * (q.transpose(1, 2) @ q))
    return q


def group_sort(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Sort each of `groups` equal groups of the last axis (ascending); a permutation of x."""
    width = x.shape[-1]
    return x.unflatten(-1, (groups, width // groups)).sort(dim=-1).values.flatten(-2)


class OrthonormalLinear(nn.Module):
    """K affine maps x W[k] + b[k] with semi-orthogonal W[k] [in, out] (spectral norm 1)."""

    def __init__(self, n_maps: int, in_features: int, out_features: int,
                 method: Orthonormalisation = "cayley", iterations: int = 20) -> None:
        super().__init__()
        if method not in ORTHONORMALISATIONS:
            raise ValueError(f"unknown orthonormalisation {method!r}; choose one of {', '.join(ORTHONORMALISATIONS)}")
        self.in_features, self.out_features = in_features, out_features
        self.method, self.iterations = method, iterations
        self.param = nn.Parameter(torch.zeros(n_maps, max(in_features, out_features), min(in_features, out_features)))
        self.bias = nn.Parameter(torch.zeros(n_maps, 1, out_features))

    def weight(self) -> torch.Tensor:
        """The semi-orthogonal weights [K, in, out]."""
        q = cayley(self.param) if self.method == "cayley" else bjorck(self.param, self.iterations)
        return q if self.in_features >= self.out_features else q.transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight())

    @torch.no_grad()
    def init_map(self, k: int, generator: torch.Generator) -> None:
        """P[k] ~ U[-1/sqrt(in), 1/sqrt(in)] (torch's Linear init), bias 0."""
        bound = 1.0 / math.sqrt(self.in_features)
        self.param[k].uniform_(-bound, bound, generator=generator)
        self.bias[k].zero_()


class LipschitzPotential(nn.Module):
    """K 1-Lipschitz potentials f_k: R^d -> R (orthonormal layers, GroupSort); [K, b, d] -> [K, b, 1]."""

    def __init__(self, n_maps: int, dim: int, hidden: tuple[int, ...] = (64, 64, 64, 64), groups: int = 4,
                 method: Orthonormalisation = "cayley", iterations: int = 20) -> None:
        super().__init__()
        if any(width % groups for width in hidden):
            raise ValueError(f"GroupSort with {groups} groups needs widths divisible by {groups}, got {tuple(hidden)}")
        widths = (dim, *hidden, 1)
        self.groups = groups
        self.layers = nn.ModuleList(
            OrthonormalLinear(n_maps, w_in, w_out, method, iterations) for w_in, w_out in zip(widths[:-1], widths[1:])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = group_sort(layer(x), self.groups)
        return self.layers[-1](x)

    def init_map(self, k: int, generator: torch.Generator) -> None:
        for layer in self.layers:
            layer.init_map(k, generator)


class StackedMLP(nn.Module):
    """K MLPs R^d -> R with LeakyReLU hidden layers; `output` is applied to the last layer's logit."""

    OUTPUTS = {"softplus": F.softplus, "sigmoid": torch.sigmoid, "none": lambda z: z}

    def __init__(self, n_maps: int, dim: int, hidden: tuple[int, ...] = (64, 64, 64, 64),
                 output: Literal["softplus", "sigmoid", "none"] = "none", negative_slope: float = 0.2) -> None:
        super().__init__()
        widths = (dim, *hidden, 1)
        self.output, self.negative_slope = output, negative_slope
        self.layers = nn.ModuleList(StackedLinear(n_maps, w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:]))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output before `output`, [K, b, 1]."""
        for layer in self.layers[:-1]:
            x = F.leaky_relu(layer(x), self.negative_slope)
        return self.layers[-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.OUTPUTS[self.output](self.logits(x))

    @torch.no_grad()
    def init_map(self, k: int, generator: torch.Generator) -> None:
        """torch's Linear init per map: weights and biases U[-1/sqrt(in), 1/sqrt(in)]."""
        for layer in self.layers:
            bound = 1.0 / math.sqrt(layer.weight.shape[1])
            layer.weight[k].uniform_(-bound, bound, generator=generator)
            layer.bias[k].uniform_(-bound, bound, generator=generator)
