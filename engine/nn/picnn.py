"""Partially input-convex networks (Amos et al. 2017, Eq. 3) as CondOT uses them (Bunne et al. 2022).

psi(x, c) is convex in x for every context c, not in c; grad_x psi(., c) is a transport map per c.
With u_0 = softmax(c W_c + b_c) over the J training contexts and z_0 = [q_j(x)]_j, layer k reads

    z_{k+1} = act( (z_k * relu(u_k W^zu_k + b^z_k)) W^z_k + (x * (u_k W^xu_k + b^x_k)) W^x_k + u_k W^u_k + b^u_k )
    u_{k+1} = leaky(u_k V_k + v_k)

act = LeakyReLU(0.2) except after the last layer (width 1: psi). Convex in x when every W^z_k >= 0:
q_j is a convex quadratic, the gate relu(.) >= 0 does not depend on x, the x term is affine in x,
and leaky is convex and non-decreasing.

The quadratics q_j(x) = 0.5 (x - a_j) A_j (x - a_j)^T (A_j symmetric PSD, fixed buffers) carry the
paper's initialisation (Sec. 4): A_j = I, a_j = 0 (identity) or the Bures map of training context j
(grad q_j(x) = (x - a_j) A_j = x A_j + b_j with a_j = -b_j A_j^-1). They are written as distances
to a centre, so q_j >= 0 and the leaky units start in their linear part without the paper's large
biases. `init_map` makes psi(x, c) = sum_j u_j(c) q_j(x) exactly (W^zu_0 = I, b^z_0 = 0; W^z_0 = 1,
later W^z_k = 1/width, b^z_k = 1; W^x_k = 0, W^u_k = 0; V_k = I, v_k = 0; only W^xu_k is drawn,
U[-s, s]), and `set_contexts` makes u_0(c_j) close to the j-th unit vector: W_c = 2 beta C^T,
b_c = -beta |c_j|^2, so u_0(c) = softmax_j(-beta |c - c_j|^2) (the paper's softmax(c^T M), M = C,
plus a bias and a sharpness beta, so that scalar contexts such as a dose pick their nearest
training value, and an unseen context mixes its neighbours' maps).

Every parameter keeps a leading model axis M (several models, e.g. Tune trials, stack); a shared
CondOT model has M = 1. Inputs x [M, n, d], contexts c [M, n, q]; output [M, n, 1].
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engine.nn.stacked import ConvexPath, StackedLinear


class PICNNLayer(nn.Module):
    """One z-layer of a PICNN over M stacked models (shapes in the module docstring)."""

    def __init__(self, n_models: int, dim: int, contexts: int, width_in: int, width_out: int) -> None:
        super().__init__()
        self.gate = StackedLinear(n_models, contexts, width_in)  # W^zu, b^z
        self.z = StackedLinear(n_models, width_in, width_out, bias=False)  # W^z >= 0
        self.x_gate = StackedLinear(n_models, contexts, dim)  # W^xu, b^x
        self.x = StackedLinear(n_models, dim, width_out, bias=False)  # W^x
        self.u = StackedLinear(n_models, contexts, width_out)  # W^u, b^u

    def forward(self, z: torch.Tensor, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The pre-activation of z_{k+1}."""
        return self.z(z * F.relu(self.gate(u))) + self.x(x * self.x_gate(u)) + self.u(u)


class StackedPICNN(ConvexPath):
    """M potentials psi_m(x, c), convex in x; J fixed quadratics feed z_0 (one per training context)."""

    def __init__(
        self,
        n_models: int,
        dim: int,
        context_dim: int,
        n_quadratics: int,
        hidden: tuple[int, ...] = (64, 64, 64, 64),
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        if context_dim < 1 or n_quadratics < 1:
            raise ValueError(f"a PICNN needs contexts and quadratics (got context_dim={context_dim}, J={n_quadratics})")
        self.negative_slope = negative_slope
        widths = (n_quadratics, *hidden, 1)
        self.modulator = StackedLinear(n_models, context_dim, n_quadratics)  # W_c, b_c (softmax)
        self.context_layers = nn.ModuleList(StackedLinear(n_models, n_quadratics, n_quadratics) for _ in widths[1:-1])
        self.layers = nn.ModuleList(
            PICNNLayer(n_models, dim, n_quadratics, w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        self.register_buffer("matrices", torch.eye(dim).repeat(n_models, n_quadratics, 1, 1))  # A_j [M, J, d, d]
        self.register_buffer("centers", torch.zeros(n_models, n_quadratics, dim))  # a_j [M, J, d]

    def quadratics(self, x: torch.Tensor) -> torch.Tensor:
        """z_0 = [q_j(x)]_j [M, n, J], q_j(x) = 0.5 (x - a_j) A_j (x - a_j)^T."""
        diff = x.unsqueeze(2) - self.centers.unsqueeze(1)  # [M, n, J, d]
        product = torch.einsum("mnjd,mjde->mnje", diff, self.matrices)
        return 0.5 * (product * diff).sum(-1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        u = torch.softmax(self.modulator(context), dim=-1)
        z = self.quadratics(x)
        last = len(self.layers) - 1
        for k, layer in enumerate(self.layers):
            z = layer(z, x, u)
            if k < last:
                z = F.leaky_relu(z, self.negative_slope)
                u = F.leaky_relu(self.context_layers[k](u), self.negative_slope)
        return z

    def gradient(self, x: torch.Tensor, context: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """grad_x psi(x, c) per cell [M, n, d]: the transport map of context c."""
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self(x, context).sum(), x, create_graph=create_graph)
        return grad

    @torch.no_grad()
    def init_map(self, m: int, generator: torch.Generator, scale: float) -> None:
        """Model m starts at psi(x, c) = sum_j u_j(c) q_j(x) (module docstring); W^xu ~ U[-scale, scale]."""
        j = self.centers.shape[1]
        for layer in self.context_layers:
            layer.weight[m].copy_(torch.eye(j))
            layer.bias[m].zero_()
        for k, layer in enumerate(self.layers):
            width_in = layer.z.weight.shape[1]
            layer.gate.weight[m].copy_(torch.eye(j) if k == 0 else torch.zeros(j, width_in))
            layer.gate.bias[m].fill_(0.0 if k == 0 else 1.0)
            layer.z.weight[m].fill_(1.0 if k == 0 else 1.0 / width_in)
            layer.x_gate.weight[m].uniform_(-scale, scale, generator=generator)
            layer.x_gate.bias[m].zero_()
            layer.x.weight[m].zero_()
            layer.u.weight[m].zero_()
            layer.u.bias[m].zero_()

    @torch.no_grad()
    def set_contexts(self, contexts: torch.Tensor, sharpness: float) -> None:
        """u_0(c) = softmax_j(-beta |c - c_j|^2) over the training contexts c_j [J, q] (every model);
        beta = sharpness / (smallest squared distance between two training contexts)."""
        gaps = torch.cdist(contexts, contexts).square()
        distinct = gaps[gaps > 0]
        beta = sharpness / float(distinct.min()) if distinct.numel() else 1.0
        self.modulator.weight.copy_(2 * beta * contexts.T.to(self.modulator.weight))
        self.modulator.bias.copy_(-beta * contexts.square().sum(-1).to(self.modulator.bias))

    @torch.no_grad()
    def set_affine(self, matrices: torch.Tensor, shifts: torch.Tensor) -> None:
        """q_j with grad q_j(x) = x A_j + b_j, for A [J, d, d] symmetric positive definite, b [J, d]
        (every model): a_j = -b_j A_j^-1."""
        centers = -torch.linalg.solve(matrices, shifts.unsqueeze(-1)).squeeze(-1)  # A symmetric: b A^-1 = A^-1 b
        self.matrices.copy_(matrices.to(self.matrices).expand_as(self.matrices))
        self.centers.copy_(centers.to(self.centers).expand_as(self.centers))

    def _hidden_path(self) -> list[torch.Tensor]:
        """The weights that must stay >= 0 for convexity in x: W^z_k."""
        return [layer.z.weight for layer in self.layers]
