"""Stacked layers: K independent networks evaluated as one batched network.

Every parameter carries a leading map axis K, a batch is [K, b, d], and a layer is one batched
matmul. Nothing mixes the map axis, so training K maps stacked equals training each alone.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class StackedLinear(nn.Module):
    """K affine maps at once: y[k] = x[k] @ W[k] + b[k], W of shape [K, in, out]."""

    def __init__(self, n_maps: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_maps, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(n_maps, 1, out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight)
        return torch.baddbmm(self.bias, x, self.weight)


class StackedQuadratic(nn.Module):
    """A gated convex quadratic q(x) = s * (0.5 x A x^T + <x, b>), so grad q(x) = s (x A + b).

    A, b carry the identity (A = I, b = 0) or Gaussian start (the Bures map between Gaussian fits;
    CondOT, Bunne et al. 2022) of an ICNN potential and stay fixed. The gate s = sum_j w_j, w_j >= 0,
    is trained like a hidden-path weight, so the network can scale the start (otherwise the
    potential's Hessian could never fall below A and the map could never contract or expand past its
    start) while the ICNN adds the residual. As in CondOT, where the quadratic enters through a
    hidden layer whose weights start at 1/width, s is `width` weights of 1/width: Adam moves each by
    about its lr per step, so s moves by up to width x lr (a single scalar at lr 1e-4 would need ~10k
    steps to double), which is why CellOT gives the gate its own, smaller lr (`gate_lr`). Training A
    itself made the min-max cycle and diverge in our d = 8 Gaussian test (L2-UVP 24% at step 500,
    12,890% at 3000).
    """

    def __init__(self, n_maps: int, dim: int, width: int = 64) -> None:
        super().__init__()
        self.register_buffer("matrix", torch.eye(dim).repeat(n_maps, 1, 1))
        self.register_buffer("shift", torch.zeros(n_maps, 1, dim))
        self.gate = nn.Parameter(torch.full((n_maps, 1, width), 1.0 / width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = 0.5 * (torch.bmm(x, self.matrix) * x).sum(-1, keepdim=True) + (x * self.shift).sum(-1, keepdim=True)
        return self.gate.sum(-1, keepdim=True) * q

    def inverse_hessian(self) -> torch.Tensor:
        """(s A)^-1 [K, d, d], the inverse Hessian of q (a preconditioner for conjugate solvers)."""
        return torch.linalg.inv_ex(self.matrix).inverse / self.gate.detach().sum(-1, keepdim=True).clamp_min(1e-6)

    @torch.no_grad()
    def set_affine(self, matrix: torch.Tensor, shift: torch.Tensor) -> None:
        """Start at x -> x A + b given A [K, d, d] (symmetric PSD) and b [K, d]."""
        self.matrix.copy_(matrix)
        self.shift.copy_(shift.unsqueeze(1))


class ConvexPath(nn.Module):
    """A potential convex in its input while the weights of `_hidden_path()` are >= 0 (ICNN, PICNN):
    the clamp (after each step of a potential that must stay convex) and CellOT's penalty."""

    def _hidden_path(self) -> list[torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def clamp_hidden_weights(self) -> None:
        """Project onto the convex set: every hidden-path weight <- max(., 0)."""
        for weight in self._hidden_path():
            weight.clamp_(min=0)

    def negative_weight_penalty(self, squared: bool = False) -> torch.Tensor:
        """Per-model sum_i ||relu(-W_i)||_F over the hidden path, shape [K] (CellOT's penalty on g), or
        with `squared` sum_i ||relu(-W_i)||_F^2 (NubOT's, Lübeck et al. 2022, D.3)."""
        norms = (F.relu(-weight).flatten(1).norm(dim=1) for weight in self._hidden_path())
        return sum(norm.square() if squared else norm for norm in norms)
