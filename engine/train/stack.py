"""What a stack is: a named group of maps, their cells on one device, their contexts, their solver.

A stack of at most `stack_size` maps is trained as one network (or, for a shared solver, one model
over the stack's contexts). Its name comes from its maps, so a restarted worker finds its files.
A shared solver's stack may hold held-out contexts (no training cells): they are not trained on,
only evaluated, with the baselines of the nearest trained context.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from engine.config import RunConfig
from engine.data import MapKey, PreparedData
from engine.data.contexts import map_contexts
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


def trained_maps(prepared: PreparedData, keys: list[MapKey]) -> list[MapKey]:
    """The maps of `keys` with training cells (all but held-out contexts): what a stack trains on."""
    return [k for k in keys if prepared.has_training_cells(k)]


def nearest_trained(prepared: PreparedData, keys: list[MapKey]) -> list[int]:
    """Per map of `keys`, its index among trained_maps(keys), or for a held-out context the index of
    the trained map with the nearest context (Euclidean; the first on ties)."""
    trained = trained_maps(prepared, keys)
    contexts = map_contexts(prepared, keys)
    seen = map_contexts(prepared, trained)
    return [trained.index(k) if k in trained else int(np.argmin(((seen - c) ** 2).sum(1)))
            for k, c in zip(keys, contexts)]


def stack_data(prepared: PreparedData, keys: list[MapKey], config: RunConfig, device: torch.device,
               share: tuple[int, int] = (0, 1)) -> StackData:
    """Training cells, a fixed selection subset (eval_cells per map, from the `select_on` split:
    valid by default, test for CellOT's protocol) and the contexts of each map of
    trained_maps(keys) (a held-out context has no training cells: it is only evaluated); `share`
    (rank, workers): this worker's share of every minibatch (data-parallel training)."""
    train = config.train
    keys = trained_maps(prepared, keys)
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
        contexts=map_contexts(prepared, keys),
        share=share,
    )


def new_solver(config: RunConfig, data: StackData, device: torch.device) -> StackSolver:
    """The run's solver for a stack's data: seeded per-map init, data-dependent init, on `device`."""
    context_dim = 0 if data.contexts is None else data.contexts.shape[1]
    solver = build_solver(config.solver, data.n_maps, data.dim, config.solver_params, context_dim)
    solver.initialize(data, data.seeds.flatten().tolist())
    return solver.to(device)
