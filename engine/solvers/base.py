"""The solver protocol: K maps as one torch module, trained by the device-level loop.

A solver reads like its paper's algorithm box: networks, losses, one training step. Sampling,
devices, evaluation cadence, best-state bookkeeping, divergence and checkpoints live in
`engine.train`, which drives any solver through this interface only:

    solver = SolverClass(n_maps, dim, config)         # on CPU
    solver.initialize(data, seeds)                     # per-map seeded draws, then data moments
    solver.to(device); solver.optimizers = solver.build_optimizers()
    logs = solver.train_step(data, step)               # per-map scalars [K], no host sync
    solver.transport(x) -> Transport(cells, weights)   # x [K, n, d]

Every parameter and buffer has the map axis first, so the loop can keep, restore and freeze maps
by mask without knowing what the networks are. Solvers with several phases (W1OT) branch on
`step`; unbalanced solvers (NubOT) return weights; conditional ones (CondOT) take a context.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from engine.train.stack_data import StackData


@dataclass
class Transport:
    """Predicted cells [K, n, d] and, for unbalanced solvers, a weight per cell [K, n]."""

    cells: torch.Tensor
    weights: torch.Tensor | None = None


class StackSolver(nn.Module):
    """Base class: subclasses set `name`, `Config` (a dataclass of published defaults) and the steps."""

    name: ClassVar[str]
    Config: ClassVar[type]
    trainable: ClassVar[bool] = True
    published_steps: ClassVar[int] = 0

    def __init__(self, n_maps: int, dim: int, config: Any) -> None:
        super().__init__()
        self.n_maps, self.dim, self.config = n_maps, dim, config
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    # -- to implement -------------------------------------------------------------------------
    def init_map(self, k: int, generator: torch.Generator) -> None:
        """Draw map k's random weights from its own generator."""

    def init_from_data(self, data: StackData) -> None:
        """Data-dependent initialisation (moments of each map's training cells)."""

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def train_step(self, data: StackData, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{self.name} has no training step")

    def transport(self, x: torch.Tensor, context: Any = None) -> Transport:
        raise NotImplementedError

    # -- shared machinery -----------------------------------------------------------------------
    def initialize(self, data: StackData, seeds: Sequence[int]) -> None:
        """Seeded per-map init (independent of the stack) followed by the data-dependent part."""
        for k, seed in enumerate(seeds):
            self.init_map(k, torch.Generator().manual_seed(int(seed)))
        self.init_from_data(data)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A detached copy of every map's state (parameters and buffers)."""
        return {name: t.detach().clone() for name, t in self.state_dict().items()}

    @torch.no_grad()
    def restore_maps(self, snapshot: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
        """Set the maps selected by mask [K] (bool) back to their values in snapshot."""
        for name, tensor in self.state_dict(keep_vars=True).items():
            select = mask.view(-1, *([1] * (tensor.dim() - 1)))
            tensor.copy_(torch.where(select, snapshot[name], tensor))

    def optimizer_state(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def make_config(config_class: type, params: dict[str, Any]) -> Any:
    """Build a solver config from a plain dict (YAML/CLI), rejecting unknown keys by name."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(f"unknown solver option(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    defaults = config_class()
    converted = {}
    for key, value in params.items():
        default = getattr(defaults, key)
        converted[key] = tuple(value) if isinstance(default, tuple) else type(default)(value)
    return config_class(**converted)
