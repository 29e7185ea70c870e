"""The device-level training loop over one stack (no Ray here).

The loop runs the solver's plan (engine.solvers.base.Plan), phase by phase. Every `eval_every` steps
and at every phase end it computes each map's validation MMD (6 gammas, on the stack's validation
cells, with the map's context); in phases that select, each unit (a map, or a shared model) keeps
its best state (CellOT keeps its best-MMD checkpoint). A unit whose losses turn NaN/inf is restored
to its best state, frozen and marked diverged (one that diverges before any selectable state keeps
its initial state); the others go on. The whole stack (weights,
optimizer and scheduler state, best states, step, draw counter, history) checkpoints and resumes
exactly, also in the middle of a phase; a stop requested through on_progress checkpoints first.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from engine.metrics.distances import MMD_GAMMAS, mmd
from engine.options import DataError
from engine.solvers.base import Plan, StackSolver
from engine.storage import PathLike, StoragePath, as_storage
from engine.train.checkpoint import load_checkpoint, save_checkpoint
from engine.train.stack_data import StackData


@dataclass
class TrainConfig:
    """Training-loop settings shared by all solvers (solver constants live in the solver's Config)."""

    steps: int = 2000  # outer steps over all phases; CellOT published 100k (`--published`)
    batch_size: int = 256
    eval_every: int = 250
    eval_cells: int = 500  # validation cells per map for the periodic validation MMD
    checkpoint_every: int = 1000
    stack_size: int = 64  # maps trained as one stack
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_every", "eval_cells", "checkpoint_every", "stack_size"):
            if getattr(self, name) < 1:
                raise DataError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0 or self.seed < 0:
            raise DataError(f"train.steps and train.seed must be >= 0, got {self.steps} and {self.seed}")


@dataclass
class StackOutcome:
    """What training a stack produced, per map: best step, best validation MMD, divergence."""

    steps: int
    best_step: list[int]
    best_mmd: list[float]
    diverged: list[bool]
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0  # the checkpoint's step when training resumed from one


EvalCallback = Callable[[int, dict[str, torch.Tensor]], None]


class StopRequested(BaseException):
    """Raised by on_progress to stop training (a user stopped the run): the loop checkpoints the
    step it reached, then lets it through, so the run resumes from exactly there."""


class _Bookkeeping:
    """Best states and divergence masks of a stack, one entry per selection unit."""

    def __init__(self, solver: StackSolver, device: torch.device) -> None:
        units = solver.n_units
        self.best = solver.snapshot()
        self.best_mmd = torch.full((units,), float("inf"), device=device)
        self.best_step = torch.zeros(units, dtype=torch.int64, device=device)
        self.diverged = torch.zeros(units, dtype=torch.bool, device=device)
        self.nonfinite = torch.zeros(units, dtype=torch.bool, device=device)

    def state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("best", "best_mmd", "best_step", "diverged", "nonfinite")}

    def load(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class _Window:
    """Sums of the per-step logs since the last evaluation (their means are logged there)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        for name, value in logs.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += 1

    def means(self) -> dict[str, torch.Tensor]:
        """The means since the last call; the window starts afresh."""
        out = {name: total / self.count for name, total in self.sums.items()}
        self.sums, self.count = {}, 0
        return out


def validation_mmd(solver: StackSolver, data: StackData) -> torch.Tensor:
    """MMD (6 gammas) per map [K] between its transported validation controls and validation targets."""
    moved = solver.transport(data.valid_source.cells, data.contexts)
    source_weights = data.valid_source.weights if moved.weights is None else data.valid_source.weights * moved.weights
    return mmd(moved.cells, data.valid_target.cells, MMD_GAMMAS, source_weights, data.valid_target.weights)


def _per_unit(solver: StackSolver, values: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Per-map values [K] (or a shared model's [1]) reduced to the solver's units."""
    return reduce(values.reshape(1, -1)).reshape(1) if solver.shared else values


def _per_map(solver: StackSolver, values: torch.Tensor) -> torch.Tensor:
    """Per-unit values broadcast back to the K maps."""
    return values.expand(solver.n_maps) if solver.shared else values


def evaluation_steps(plan: Plan, eval_every: int) -> list[int]:
    """The steps after which the loop evaluates: 0, every `eval_every`, and every phase end."""
    return sorted({0, *range(eval_every, plan.total + 1, eval_every), *(end for _, _, end in plan.spans())})


def train_stack(
    solver: StackSolver,
    data: StackData,
    config: TrainConfig,
    *,
    checkpoint: PathLike | None = None,
    on_eval: EvalCallback | None = None,
    on_progress: Callable[[int], None] | None = None,
    writes_checkpoint: bool = True,
) -> StackOutcome:
    """Train the (initialised, on-device) solver through its plan; leave each unit at its best state.
    `checkpoint` is resumed from when it exists, and written unless `writes_checkpoint` is False (a
    data-parallel worker other than the first: the first writes the state they all hold)."""
    started = time.perf_counter()
    plan = solver.plan(solver.config, config.steps)
    solver.start_training(plan)
    book = _Bookkeeping(solver, data.device)
    history: list[dict[str, Any]] = []
    window = _Window()
    start = 0
    checkpoint = None if checkpoint is None else as_storage(checkpoint)
    if checkpoint is not None and checkpoint.exists():
        start, history = _resume(checkpoint, plan, solver, data, book, window)
        if on_progress is not None:
            on_progress(start)
    any_diverged = bool(book.diverged.any())  # host copy: the per-step loop never waits on the device
    evaluations = set(evaluation_steps(plan, config.eval_every))

    def evaluate(step: int, phase: str, logs: dict[str, torch.Tensor]) -> None:
        """Validation MMD of the state after `step` steps (reached in `phase`); selection, logs."""
        nonlocal any_diverged
        newly = book.nonfinite & ~book.diverged
        if bool(newly.any()):
            book.diverged |= newly
            solver.restore_maps(book.best, newly)
            any_diverged = True
        with torch.enable_grad():
            value = validation_mmd(solver, data).detach()
        if plan.selects_at(step):
            unit_value = _per_unit(solver, value, lambda v: v.mean(1))
            improved = (unit_value < book.best_mmd) & torch.isfinite(unit_value) & ~book.diverged
            if bool(improved.any()):
                book.best = solver.blend(book.best, solver.snapshot(), improved)
                book.best_mmd = torch.where(improved, unit_value, book.best_mmd)
                book.best_step = torch.where(improved, torch.full_like(book.best_step, step), book.best_step)
        row = {"mmd": value, **{name: v.reshape(-1).expand(data.n_maps) for name, v in logs.items()}}
        history.append({"step": step, "phase": phase, **{k: v.tolist() for k, v in row.items()}})
        if on_eval is not None:
            on_eval(step, row)

    if start == 0:
        evaluate(0, plan.phase_at(0).name if plan.total else "", {})
    for phase, begin, end in plan.spans():
        for step in range(max(start, begin), end):
            logs = solver.train_step(data, step, phase)
            for value in logs.values():
                book.nonfinite |= _per_unit(solver, ~torch.isfinite(value.reshape(-1)), lambda v: v.any(1))
            window.add(logs)
            if any_diverged:  # frozen units go back to their best state after every step
                solver.restore_maps(book.best, book.diverged)
            done = step + 1
            if done in evaluations:
                evaluate(done, phase.name, window.means())
            saves = checkpoint is not None and writes_checkpoint
            if saves and (done % config.checkpoint_every == 0 or done == plan.total):
                _save(checkpoint, plan, solver, data, book, done, history, window)
            if on_progress is not None:
                try:
                    on_progress(done)
                except StopRequested:
                    if saves:
                        _save(checkpoint, plan, solver, data, book, done, history, window)
                    raise
    if plan.selects:
        solver.restore_maps(book.best, torch.ones(solver.n_units, dtype=torch.bool, device=data.device))
    else:  # nothing selects (e.g. a baseline): the last state is the result
        book.best_step.fill_(plan.total)
    return StackOutcome(
        steps=plan.total,
        best_step=_per_map(solver, book.best_step).tolist(),
        best_mmd=_per_map(solver, book.best_mmd).tolist(),
        diverged=_per_map(solver, book.diverged).tolist(),
        seconds=time.perf_counter() - started,
        history=history,
        resumed_from=start,
    )


def _save(path: StoragePath, plan: Plan, solver: StackSolver, data: StackData, book: _Bookkeeping, step: int,
          history: list, window: _Window) -> None:
    save_checkpoint(
        path,
        {
            "plan": plan.describe(),
            "step": step,
            "draws": data.draws,
            "solver": solver.state_dict(),
            "training": solver.training_state(),
            "book": book.state(),
            "history": history,
            "window": {"sums": window.sums, "count": window.count},
        },
    )


def _resume(path: StoragePath, plan: Plan, solver: StackSolver, data: StackData, book: _Bookkeeping,
            window: _Window) -> tuple[int, list]:
    state = load_checkpoint(path, data.device)
    saved = [tuple(p) for p in state["plan"]]
    if not plan.continues(saved, int(state["step"])):
        raise DataError(f"checkpoint {path} was made at step {state['step']} of plan {saved}; this run's plan "
                        f"{plan.describe()} does not continue it (same phases; only the last may change length)")
    try:
        solver.load_state_dict(state["solver"])
    except RuntimeError as error:  # missing / unexpected / mis-shaped parameters
        raise DataError(f"checkpoint {path} was written with other solver settings (its parameters do not fit); "
                        "start a new run directory or restore that run's config") from error
    solver.load_training_state(state["training"])
    book.load(state["book"])
    data.draws = state["draws"]
    window.sums, window.count = dict(state["window"]["sums"]), int(state["window"]["count"])
    return int(state["step"]), list(state["history"])
