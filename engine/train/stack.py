"""What a stack is: a named group of maps, their cells on one device, their contexts, their solver.

A stack of at most `stack_size` maps is trained as one network (or, for a shared solver, one model
over the stack's contexts). Its name comes from its maps, so a restarted worker finds its files.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from engine.config import RunConfig
from engine.data import MapKey, PreparedData
from engine.solvers import StackSolver, build_solver
from engine.train.stack_data import StackData, map_seed


def stack_id(keys: list[MapKey]) -> str:
    """A stable name for a stack, from its maps (the same maps give the same files after a restart)."""
    return "stack-" + hashlib.sha256("\n".join(k.name for k in keys).encode()).hexdigest()[:12]


def stacks_of(keys: list[MapKey], stack_size: int, shared: bool = False) -> list[list[MapKey]]:
    """Consecutive chunks of at most stack_size maps; a shared solver's maps are one stack (one
    model over all their contexts)."""
    size = len(keys) if shared else max(1, stack_size)
    return [keys[i : i + size] for i in range(0, len(keys), max(1, size))]


def map_contexts(all_maps: list[MapKey], keys: list[MapKey]) -> np.ndarray:
    """Context of each map in `keys` [K, c]: a multi-hot of its perturbation's parts ("A+B" is the sum
    of A's and B's one-hots), then a one-hot of its group, over the parts and groups of `all_maps`
    (the run's maps, so a map's context does not depend on its stack)."""
    parts = sorted({p for key in all_maps for p in key.perturbation.split("+")})
    groups = sorted({key.group for key in all_maps if key.group is not None})
    contexts = np.zeros((len(keys), len(parts) + len(groups)), np.float32)
    for k, key in enumerate(keys):
        for part in key.perturbation.split("+"):
            contexts[k, parts.index(part)] += 1.0
        if key.group is not None:
            contexts[k, len(parts) + groups.index(key.group)] = 1.0
    return contexts


def stack_data(prepared: PreparedData, keys: list[MapKey], config: RunConfig, device: torch.device) -> StackData:
    """Training cells, a fixed selection subset (eval_cells per map, from the `select_on` split:
    valid by default, test for CellOT's protocol) and the contexts of each map."""
    train = config.train
    control, select_on = prepared.spec.control, prepared.spec.select_on

    def subset(cells: np.ndarray, seed: int) -> np.ndarray:
        take = np.random.default_rng(seed).permutation(len(cells))[: train.eval_cells]
        return cells[np.sort(take)]

    seeds = [map_seed(train.seed, k.name) for k in keys]
    return StackData(
        source=[prepared.cells(k.group, control, "train") for k in keys],
        target=[prepared.cells(k.group, k.perturbation, "train") for k in keys],
        valid_source=[subset(prepared.cells(k.group, control, select_on), s) for k, s in zip(keys, seeds)],
        valid_target=[subset(prepared.cells(k.group, k.perturbation, select_on), s + 1) for k, s in zip(keys, seeds)],
        seeds=seeds,
        batch_size=train.batch_size,
        device=device,
        contexts=map_contexts(prepared.maps, keys),
    )


def new_solver(config: RunConfig, data: StackData, keys: list[MapKey], device: torch.device) -> StackSolver:
    """The run's solver for a stack: seeded per-map init, data-dependent init, on `device`."""
    context_dim = 0 if data.contexts is None else data.contexts.shape[1]
    solver = build_solver(config.solver, len(keys), data.dim, config.solver_params, context_dim)
    solver.initialize(data, [map_seed(config.train.seed, k.name) for k in keys])
    return solver.to(device)
