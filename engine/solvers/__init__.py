"""Solver registry: a new solver registers here and needs no change to the training core."""
from __future__ import annotations

from typing import Any

from engine.options import DataError
from engine.solvers.base import StackSolver, Transport, make_config
from engine.solvers.baselines import GaussianMap, Identity, MeanShift, Observed
from engine.solvers.cellot import CellOT
from engine.solvers.condot import CondOT
from engine.solvers.nubot import NubOT
from engine.solvers.w1ot import W1OT

SOLVERS: dict[str, type[StackSolver]] = {
    cls.name: cls for cls in (CellOT, CondOT, W1OT, NubOT, Identity, Observed, MeanShift, GaussianMap)
}


def solver_class(name: str) -> type[StackSolver]:
    if name not in SOLVERS:
        raise DataError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    return SOLVERS[name]


def build_solver(
    name: str, n_maps: int, dim: int, params: dict[str, Any] | None = None, context_dim: int = 0
) -> StackSolver:
    """Instantiate solver `name` for a stack of n_maps maps in dimension dim, with contexts of
    context_dim features (0: none), on CPU."""
    cls = solver_class(name)
    return cls(n_maps, dim, make_config(cls.Config, params or {}), context_dim)


__all__ = ["SOLVERS", "StackSolver", "Transport", "build_solver", "solver_class"]
