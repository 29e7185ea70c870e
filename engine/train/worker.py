"""The worker's job: train a list of maps stack by stack on one device, save, evaluate, predict.

This is what one Ray Train worker runs over the maps it owns (engine.cluster.trainer), and what
tests and benchmarks run directly, without Ray. For each stack: the cells go to the device once,
the solver trains (resuming from the stack's checkpoint if one exists), the best states are saved,
and every map is evaluated on test cells beside the baselines. A stack whose maps file exists is
skipped, so a restarted worker picks up where it stopped; a failed stack does not stop the others.
When the reporter asks it to stop, the running stack checkpoints and StopRequested ends the job.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from engine.config import RunConfig
from engine.data import MapKey, PreparedData
from engine.data.contexts import map_contexts
from engine.rundir import RunDir
from engine.solvers.optim import Average
from engine.storage import to_bytes
from engine.train.evaluation import evaluate_maps, metric_rows
from engine.train.loop import StopRequested, train_stack
from engine.train.saved_maps import save_maps
from engine.train.stack import new_solver, stack_data, stack_id, stacks_of, trained_maps

PROGRESS_EVERY = 50  # steps between progress reports
FINAL_STATUSES = ("trained", "diverged", "failed")  # a map in one of these is done with (for this run)


class Reporter(Protocol):
    """Where a worker sends what it learns (the Ray metrics sink, or a store directly)."""

    def metrics(self, rows: list[dict]) -> None: ...

    def maps(self, rows: list[dict]) -> None: ...

    def progress(self, stack: str, done: int) -> bool:
        """Steps done in a stack; True asks the worker to stop (the run is being stopped)."""


@dataclass
class MapRun:
    """What every stack of one worker shares: the cells, the run's config and where results go.

    Data-parallel training of a shared model (engine.cluster.trainer): every worker runs the same
    stack with `share` = (rank, workers) of each minibatch and `average` (the mean over workers,
    StackSolver.average); the first worker (rank 0) alone reports, checkpoints, evaluates and saves."""

    prepared: PreparedData
    config: RunConfig
    run_dir: RunDir
    reporter: Reporter
    device: torch.device
    run_id: str
    share: tuple[int, int] = (0, 1)
    average: Average | None = None

    @property
    def leads(self) -> bool:
        """Does this worker report and write (the only one, or rank 0 of a data-parallel group)?"""
        return self.share[0] == 0

    def map_rows(self, keys: list[MapKey], status: str, **fields: object) -> list[dict]:
        return [{"run_id": self.run_id, "perturbation": k.name, "status": status, **fields} for k in keys]


def train_maps(run: MapRun, keys: list[MapKey]) -> None:
    """Train, save, evaluate and predict every map in `keys`, stack by stack."""
    for chunk in stacks_of(keys, run.config.train.stack_size, run.config.solver_cls.shared):
        stack = stack_id(chunk)
        if run.run_dir.maps_file(stack).exists():
            continue
        try:
            _train_one_stack(run, chunk, stack)
        except Exception as error:  # one failed stack must not lose the others
            run.reporter.maps(run.map_rows(chunk, "failed", error=f"{type(error).__name__}: {error}"))
            traceback.print_exc()
            if run.average is not None:  # data parallel: the other workers would wait for this one in the
                raise                    # all-reduce; failing ends the group (Ray Train restarts it from the checkpoint)


def _train_one_stack(run: MapRun, keys: list[MapKey], stack: str) -> None:
    config, reporter = run.config, run.reporter
    trained = trained_maps(run.prepared, keys)  # all but a shared model's held-out contexts
    data = stack_data(run.prepared, keys, config, run.device, run.share)
    solver = new_solver(config, data, run.device)
    solver.average = run.average
    if run.leads:
        reporter.maps(run.map_rows(keys, "running"))
    total = solver.plan(solver.config, config.train.steps).total
    select_split = "valid" if run.prepared.spec.select_on == "valid" else "valid_test"

    def on_eval(step: int, row: dict[str, torch.Tensor]) -> None:
        if not run.leads:
            return
        reporter.metrics(
            [
                {"run_id": run.run_id, "perturbation": key.name, "split": select_split if name == "mmd" else "train",
                 "metric": name, "value": float(values[k]), "step": step}
                for name, values in ((n, v.detach().cpu()) for n, v in row.items())
                for k, key in enumerate(trained)
            ]
        )

    last_report = [-PROGRESS_EVERY]

    def on_progress(done: int) -> None:  # first call: where a resumed stack starts
        if done - last_report[0] >= PROGRESS_EVERY or done == total:
            last_report[0] = done
            stop = run.leads and reporter.progress(stack, done)
            if run.average is not None:  # every data-parallel worker stops at the same step
                flag = torch.tensor([float(stop)], device=run.device)
                run.average([flag])
                stop = bool(flag.item() > 0)
            if stop:
                raise StopRequested

    outcome = train_stack(solver, data, config.train, checkpoint=run.run_dir.train_checkpoint(stack),
                          on_eval=on_eval, on_progress=on_progress, writes_checkpoint=run.leads)
    if not run.leads:
        return
    logs = [("train_seconds", outcome.seconds, outcome.steps)]
    if outcome.resumed_from > 0:  # a restarted worker or a resumed run: the step this stack picked up at
        logs.append(("resumed_from", float(outcome.resumed_from), outcome.resumed_from))
    reporter.metrics([{"run_id": run.run_id, "perturbation": k.name, "split": "train", "metric": name,
                       "value": value, "step": step} for k in trained for name, value, step in logs])
    records: dict[str, np.ndarray] = {}
    evaluated = evaluate_maps(run.prepared, keys, solver, data, config.train.seed)
    for k, (key, (rows, cells, weights)) in enumerate(zip(keys, evaluated)):
        reporter.metrics(metric_rows(run.run_id, key, rows, outcome.steps))
        records[f"cells/{k}"] = cells
        if weights is not None:
            records[f"weights/{k}"] = weights
    run.run_dir.stack_predictions(stack).write_bytes(
        to_bytes(lambda f: np.savez(f, maps=np.array([k.name for k in keys]), **records)))
    path = run.run_dir.maps_file(stack)
    for key in keys:  # before the maps file: a stack with a maps file has its rows
        i = trained.index(key) if key in trained else 0  # a held-out context: the shared model's outcome
        diverged = outcome.diverged[i]
        error = f"non-finite losses; kept its state of step {outcome.best_step[i]}" if diverged else None
        reporter.maps(run.map_rows([key], "diverged" if diverged else "trained", steps=outcome.steps,
                                   best_step=outcome.best_step[i], checkpoint=str(path), error=error))
    contexts = torch.from_numpy(map_contexts(run.prepared, keys))
    save_maps(path, solver, keys, contexts, config.to_dict())  # written last: it marks the stack done
