"""The device-level training loop over one stack of K maps (no Ray here).

Per-map bookkeeping is done with masks over the map axis: every `eval_every` steps each map's
validation MMD (6 gammas, on held-out cells) is computed, and each map keeps its best state
(CellOT keeps its best-MMD checkpoint). A map whose losses turn NaN/inf is restored to its best
state, frozen and marked diverged; the other maps go on. The whole stack (weights, optimizer
state, best states, step, draw counter) checkpoints and resumes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from engine.metrics.distances import MMD_GAMMAS, mmd
from engine.solvers.base import StackSolver
from engine.train.checkpoint import load_checkpoint, save_checkpoint
from engine.train.stack_data import StackData


@dataclass
class TrainConfig:
    """Training-loop settings shared by all solvers (solver constants live in the solver's Config)."""

    steps: int = 2000  # outer steps; CellOT published 100k (`--published-steps`)
    batch_size: int = 256
    eval_every: int = 250
    eval_cells: int = 500  # held-out cells per map for the periodic validation MMD
    checkpoint_every: int = 1000
    stack_size: int = 64  # maps trained as one stack
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class StackOutcome:
    """What training a stack produced, per map: best step, best validation MMD, divergence."""

    steps: int
    best_step: list[int]
    best_mmd: list[float]
    diverged: list[bool]
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)


EvalCallback = Callable[[int, dict[str, torch.Tensor]], None]


class _Bookkeeping:
    """Best states and divergence masks of a stack, all tensors with the map axis first."""

    def __init__(self, solver: StackSolver, n_maps: int, device: torch.device) -> None:
        self.best = solver.snapshot()
        self.best_mmd = torch.full((n_maps,), float("inf"), device=device)
        self.best_step = torch.zeros(n_maps, dtype=torch.int64, device=device)
        self.diverged = torch.zeros(n_maps, dtype=torch.bool, device=device)
        self.nonfinite = torch.zeros(n_maps, dtype=torch.bool, device=device)

    def state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("best", "best_mmd", "best_step", "diverged", "nonfinite")}

    def load(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def validation_mmd(solver: StackSolver, data: StackData) -> torch.Tensor:
    """MMD (6 gammas) between each map's transported held-out controls and its held-out perturbed cells."""
    moved = solver.transport(data.valid_source.cells)
    source_weights = data.valid_source.weights if moved.weights is None else data.valid_source.weights * moved.weights
    return mmd(moved.cells, data.valid_target.cells, MMD_GAMMAS, source_weights, data.valid_target.weights)


def train_stack(
    solver: StackSolver,
    data: StackData,
    config: TrainConfig,
    *,
    checkpoint: Path | None = None,
    on_eval: EvalCallback | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> StackOutcome:
    """Train the (initialised, on-device) solver's K maps; leave each map at its best state."""
    started = time.perf_counter()
    book = _Bookkeeping(solver, data.n_maps, data.device)
    steps = config.steps if solver.trainable else 0
    start = _resume(checkpoint, solver, data, book) if checkpoint is not None and checkpoint.exists() else None
    history: list[dict[str, Any]] = []
    any_diverged = bool(book.diverged.any())  # host copy: the per-step loop never waits on the device

    def evaluate(step: int, logs: dict[str, torch.Tensor]) -> None:
        nonlocal any_diverged
        newly = book.nonfinite & ~book.diverged
        if bool(newly.any()):
            book.diverged |= newly
            solver.restore_maps(book.best, newly)
            any_diverged = True
        with torch.enable_grad():
            value = validation_mmd(solver, data).detach()
        improved = (value < book.best_mmd) & torch.isfinite(value) & ~book.diverged
        if bool(improved.any()):
            current = solver.snapshot()
            for name, tensor in current.items():
                select = improved.view(-1, *([1] * (tensor.dim() - 1)))
                book.best[name] = torch.where(select, tensor, book.best[name])
            book.best_mmd = torch.where(improved, value, book.best_mmd)
            book.best_step = torch.where(improved, torch.full_like(book.best_step, step), book.best_step)
        row = {"mmd": value, **logs}
        history.append({"step": step, **{k: v.tolist() for k, v in row.items()}})
        if on_eval is not None:
            on_eval(step, row)

    if start is None:
        start = 0
        evaluate(0, {})
    sums: dict[str, torch.Tensor] = {}
    since_eval = 0
    for step in range(start, steps):
        logs = solver.train_step(data, step)
        for name, value in logs.items():
            book.nonfinite |= ~torch.isfinite(value)
            sums[name] = sums.get(name, 0.0) + value
        since_eval += 1
        if any_diverged:  # frozen maps go back to their best state after every step
            solver.restore_maps(book.best, book.diverged)
        done = step + 1
        if done % config.eval_every == 0 or done == steps:
            evaluate(done, {name: total / since_eval for name, total in sums.items()})
            sums, since_eval = {}, 0
        if checkpoint is not None and (done % config.checkpoint_every == 0 or done == steps):
            _save(checkpoint, solver, data, book, done)
        if on_progress is not None:
            on_progress(done)
    solver.restore_maps(book.best, torch.ones(data.n_maps, dtype=torch.bool, device=data.device))
    return StackOutcome(
        steps=steps,
        best_step=book.best_step.tolist(),
        best_mmd=book.best_mmd.tolist(),
        diverged=book.diverged.tolist(),
        seconds=time.perf_counter() - started,
        history=history,
    )


def _save(path: Path, solver: StackSolver, data: StackData, book: _Bookkeeping, step: int) -> None:
    save_checkpoint(
        path,
        {
            "step": step,
            "draws": data.draws,
            "solver": solver.state_dict(),
            "optimizers": solver.optimizer_state(),
            "book": book.state(),
        },
    )


def _resume(path: Path, solver: StackSolver, data: StackData, book: _Bookkeeping) -> int:
    state = load_checkpoint(path, data.device)
    solver.load_state_dict(state["solver"])
    solver.load_optimizer_state(state["optimizers"])
    book.load(state["book"])
    data.draws = state["draws"]
    return int(state["step"])
