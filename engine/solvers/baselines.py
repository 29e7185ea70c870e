"""Baselines with no training: identity, observed, mean shift and the closed-form Gaussian map.

- identity:   T(x) = x (control cells unchanged; the upper bound on error).
- observed:   returns training perturbed cells, one per input cell (the noise floor when compared
              with held-out perturbed cells).
- mean_shift: T(x) = x + (mean_t - mean_s).
- gaussian:   T(x) = x A + b, the Bures map between Gaussian fits of source and target
              (engine.ot.gaussian).
Their state is buffers with the map axis first, so they checkpoint and predict like trained maps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.ot.gaussian import COVARIANCE_RIDGE, bures_map
from engine.solvers.base import StackSolver, Transport
from engine.train.stack_data import StackData, mix32


@dataclass
class NoConfig:
    pass


@dataclass
class ObservedConfig:
    max_cells: int = 2000  # training perturbed cells kept per map


class Baseline(StackSolver):
    trainable = False
    Config = NoConfig


class Identity(Baseline):
    """Baseline T(x) = x: control cells unchanged (the upper bound on error)."""

    name = "identity"

    def transport(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Transport:
        return Transport(x.clone())


class AffineBaseline(Baseline):
    """T(x) = x A + b with per-map A [K, d, d] and b [K, 1, d] set from training moments."""

    def __init__(self, n_maps: int, dim: int, config: Any, context_dim: int = 0) -> None:
        super().__init__(n_maps, dim, config, context_dim)
        self.register_buffer("matrix", torch.eye(dim).repeat(n_maps, 1, 1))
        self.register_buffer("shift", torch.zeros(n_maps, 1, dim))

    def transport(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Transport:
        return Transport(torch.baddbmm(self.shift, x, self.matrix))


class MeanShift(AffineBaseline):
    """Baseline T(x) = x + (mean_t - mean_s) of the training cells."""

    name = "mean_shift"

    @torch.no_grad()
    def init_from_data(self, data: StackData) -> None:
        mean_s, _, mean_t, _ = data.moments(0.0)
        self.shift.copy_((mean_t - mean_s).float().unsqueeze(1))


class GaussianMap(AffineBaseline):
    """Baseline T(x) = x A + b: the closed-form Bures map between Gaussian fits of the training cells."""

    name = "gaussian"

    @torch.no_grad()
    def init_from_data(self, data: StackData) -> None:
        matrix, shift = bures_map(*data.moments(COVARIANCE_RIDGE))
        self.matrix.copy_(matrix.float())
        self.shift.copy_(shift.float().unsqueeze(1))


class Observed(Baseline):
    """Baseline: training perturbed cells, one per input cell (the noise floor)."""

    name = "observed"
    Config = ObservedConfig

    def __init__(self, n_maps: int, dim: int, config: ObservedConfig, context_dim: int = 0) -> None:
        super().__init__(n_maps, dim, config, context_dim)
        self.register_buffer("cells", torch.zeros(n_maps, config.max_cells, dim))
        self.register_buffer("counts", torch.ones(n_maps, 1, dtype=torch.int64))

    @torch.no_grad()
    def init_from_data(self, data: StackData) -> None:
        for k in range(self.n_maps):
            cells = data.target.of_map(k)[: self.config.max_cells]
            self.cells[k, : len(cells)] = cells.cpu()
            self.counts[k] = len(cells)

    def transport(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Transport:
        rows = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        index = mix32(rows) % self.counts
        return Transport(torch.gather(self.cells, 1, index.unsqueeze(-1).expand(-1, -1, self.dim)))
