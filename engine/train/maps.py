"""Train a list of maps as stacks on one device, evaluate them, keep their predictions (no Ray).

This is what one Ray Train worker runs over the maps it owns, and what benchmarks and tests run
directly. For each stack of at most `stack_size` maps: the cells go to the device once, the solver
trains (resuming from the stack's checkpoint if one exists), the best states are saved, and every
map is evaluated on held-out cells beside the identity and observed baselines. A stack whose
final file exists is skipped, so a restarted worker picks up where it stopped.
"""
from __future__ import annotations

import hashlib
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from engine.config import RunConfig
from engine.data import MapKey, PreparedData
from engine.metrics.evaluate import MetricRow, evaluate_map
from engine.solvers import StackSolver, build_solver
from engine.train.checkpoint import load_checkpoint, save_checkpoint
from engine.train.loop import train_stack
from engine.train.stack_data import StackData, map_seed

if TYPE_CHECKING:
    from engine.api import FitResult


class Reporter(Protocol):
    """Where a worker sends what it learns (the Ray metrics sink, or a store directly)."""

    def metrics(self, rows: list[dict]) -> None: ...

    def maps(self, rows: list[dict]) -> None: ...

    def progress(self, stack: str, done: int, total: int) -> None: ...


def stack_id(keys: list[MapKey]) -> str:
    """A stable name for a stack, from its maps (the same maps give the same files after a restart)."""
    return "stack-" + hashlib.sha256("\n".join(k.name for k in keys).encode()).hexdigest()[:12]


def stack_data(prepared: PreparedData, keys: list[MapKey], config: RunConfig, device: torch.device) -> StackData:
    """Training cells and a fixed held-out validation subset (eval_cells per map) of each map."""
    train = config.train
    control = prepared.spec.control

    def subset(cells: np.ndarray, seed: int) -> np.ndarray:
        take = np.random.default_rng(seed).permutation(len(cells))[: train.eval_cells]
        return cells[np.sort(take)]

    seeds = [map_seed(train.seed, k.name) for k in keys]
    return StackData(
        source=[prepared.cells(k.group, control, "train") for k in keys],
        target=[prepared.cells(k.group, k.perturbation, "train") for k in keys],
        valid_source=[subset(prepared.cells(k.group, control, "test"), s) for k, s in zip(keys, seeds)],
        valid_target=[subset(prepared.cells(k.group, k.perturbation, "test"), s + 1) for k, s in zip(keys, seeds)],
        seeds=seeds,
        batch_size=train.batch_size,
        device=device,
    )


def maps_file(run_dir: Path, stack: str) -> Path:
    return run_dir / "checkpoints" / f"{stack}.maps.pt"


def save_maps(path: Path, solver: StackSolver, keys: list[MapKey], config: RunConfig) -> None:
    """The trained maps of a stack: state dict + solver name and options (no pickled classes)."""
    payload = {
        "solver": solver.name,
        "solver_params": asdict(solver.config),
        "dim": solver.dim,
        "maps": [k.name for k in keys],
        "state": {name: t.cpu() for name, t in solver.state_dict().items()},
        "run": config.to_dict(),
    }
    save_checkpoint(path, payload)


def load_maps(path: Path, device: torch.device | str = "cpu") -> tuple[StackSolver, list[str]]:
    """Rebuild a saved stack for prediction: (solver, map names)."""
    payload = load_checkpoint(path, device)
    solver = build_solver(payload["solver"], len(payload["maps"]), payload["dim"], payload["solver_params"])
    solver.load_state_dict(payload["state"])
    return solver.to(device), list(payload["maps"])


def predict_cells(solver: StackSolver, x: list[np.ndarray], device: torch.device, chunk: int = 4096) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Transport each map's cells (x[k] for map k) in chunks: [(cells, weights or None)] per map."""
    out: list[list[np.ndarray]] = [[] for _ in x]
    weights: list[list[np.ndarray]] = [[] for _ in x]
    longest = max(len(a) for a in x)
    for start in range(0, longest, chunk):
        parts = [a[start : start + chunk] for a in x]
        width = max(len(p) for p in parts)
        batch = np.zeros((len(x), max(width, 1), solver.dim), np.float32)
        for k, p in enumerate(parts):
            batch[k, : len(p)] = p
        moved = solver.transport(torch.from_numpy(batch).to(device))
        for k, p in enumerate(parts):
            out[k].append(moved.cells[k, : len(p)].detach().cpu().numpy())
            if moved.weights is not None:
                weights[k].append(moved.weights[k, : len(p)].detach().cpu().numpy())
    return [(np.concatenate(o), np.concatenate(w) if w else None) for o, w in zip(out, weights)]


@dataclass
class MapRun:
    """What every stack of one worker shares: the cells, the run's config and where results go."""

    prepared: PreparedData
    config: RunConfig
    run_dir: Path
    reporter: Reporter
    device: torch.device
    run_id: str

    def map_rows(self, keys: list[MapKey], status: str, **fields: object) -> list[dict]:
        return [{"run_id": self.run_id, "perturbation": k.name, "status": status, **fields} for k in keys]


def train_maps(run: MapRun, keys: list[MapKey]) -> None:
    """Train, save, evaluate and predict every map in `keys`, stack by stack."""
    size = max(1, run.config.train.stack_size)
    for start in range(0, len(keys), size):
        chunk = keys[start : start + size]
        stack = stack_id(chunk)
        if maps_file(run.run_dir, stack).exists():
            continue
        try:
            _train_one_stack(run, chunk, stack)
        except Exception as error:  # one failed stack must not lose the others
            run.reporter.maps(run.map_rows(chunk, "failed", error=f"{type(error).__name__}: {error}"))
            traceback.print_exc()


def _train_one_stack(run: MapRun, keys: list[MapKey], stack: str) -> None:
    config, reporter = run.config, run.reporter
    data = stack_data(run.prepared, keys, config, run.device)
    solver = build_solver(config.solver, len(keys), run.prepared.dim, config.solver_params)
    solver.initialize(data, [map_seed(config.train.seed, k.name) for k in keys])
    solver.to(run.device)
    solver.optimizers = solver.build_optimizers()
    reporter.maps(run.map_rows(keys, "running"))
    total = config.train.steps if solver.trainable else 0

    def on_eval(step: int, row: dict[str, torch.Tensor]) -> None:
        reporter.metrics(
            [
                {"run_id": run.run_id, "perturbation": key.name, "split": "valid" if name == "mmd" else "train",
                 "metric": name, "value": float(values[k]), "step": step}
                for name, values in ((n, v.detach().cpu()) for n, v in row.items())
                for k, key in enumerate(keys)
            ]
        )

    def on_progress(done: int) -> None:
        if done % 50 == 0 or done == total:
            reporter.progress(stack, done, total)

    outcome = train_stack(
        solver, data, config.train,
        checkpoint=run.run_dir / "checkpoints" / f"{stack}.train.pt", on_eval=on_eval, on_progress=on_progress,
    )
    reporter.metrics([{"run_id": run.run_id, "perturbation": k.name, "split": "train", "metric": "train_seconds",
                       "value": outcome.seconds, "step": outcome.steps} for k in keys])
    path = maps_file(run.run_dir, stack)
    save_maps(path, solver, keys, config)
    _evaluate_and_predict(run, keys, solver, stack, outcome.steps)
    for i, key in enumerate(keys):
        status = "diverged" if outcome.diverged[i] else "trained"
        reporter.maps(run.map_rows([key], status, steps=outcome.steps, best_step=outcome.best_step[i], checkpoint=str(path)))
    reporter.progress(stack, total, total)


def evaluate_maps(
    prepared: PreparedData,
    keys: list[MapKey],
    solver: StackSolver,
    device: torch.device,
    seed: int,
    bootstrap: int = 0,
    markers: int | None = None,
    sinkhorn: bool = False,
) -> list[tuple[list[MetricRow], np.ndarray, np.ndarray | None]]:
    """Predict each map's held-out controls and score them in data space on its marker features,
    beside the identity and observed baselines: [(rows, predicted cells, weights)] per map."""
    control = prepared.spec.control
    sources = [prepared.cells(k.group, control, "test") for k in keys]
    results = []
    for key, (cells, weights) in zip(keys, predict_cells(solver, sources, device)):
        if prepared.embedding is not None:
            cells = prepared.embedding.decode(cells).astype(np.float32)
        features = prepared.markers.get(key.name)
        if features is not None and markers is not None:
            features = features[:markers]
        rows = evaluate_map(
            cells,
            prepared.cells(key.group, key.perturbation, "test", space="data"),
            prepared.cells(key.group, control, "test", space="data"),
            prepared.cells(key.group, key.perturbation, "train", space="data"),
            features=features,
            pred_weights=weights,
            bootstrap=bootstrap,
            seed=seed,
            sinkhorn=sinkhorn,
        )
        results.append((rows, cells, weights))
    return results


def metric_rows(run_id: str, key: MapKey, rows: list[MetricRow], step: int) -> list[dict]:
    return [{"run_id": run_id, "perturbation": key.name, "split": r.split, "metric": r.metric,
             "value": r.value, "step": step} for r in rows]


def _evaluate_and_predict(run: MapRun, keys: list[MapKey], solver: StackSolver, stack: str, step: int) -> None:
    """Final evaluation rows to the reporter; predictions of the held-out controls to predictions/."""
    records: dict[str, np.ndarray] = {}
    evaluated = evaluate_maps(run.prepared, keys, solver, run.device, run.config.train.seed)
    for k, (key, (rows, cells, weights)) in enumerate(zip(keys, evaluated)):
        run.reporter.metrics(metric_rows(run.run_id, key, rows, step))
        records[f"cells/{k}"] = cells
        if weights is not None:
            records[f"weights/{k}"] = weights
    out = run.run_dir / "predictions" / f"{stack}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, maps=np.array([k.name for k in keys]), **records)


def reevaluate(result: "FitResult", bootstrap: int, markers: int | None, sinkhorn: bool) -> int:
    """`perturbot evaluate`: score a finished run's saved maps again (e.g. with bootstrap); rows to its store."""
    from engine.store import Store

    prepared = PreparedData.load(result.run_dir / "data")
    known = {k.name: k for k in prepared.maps}
    store = Store(result.store_url)
    written = 0
    try:
        for path in sorted((result.run_dir / "checkpoints").glob("*.maps.pt")):
            solver, names = load_maps(path)
            keys = [known[n] for n in names]
            step = result.config.train.steps if solver.trainable else 0
            for key, (rows, _, _) in zip(keys, evaluate_maps(prepared, keys, solver, torch.device("cpu"),
                                                              result.config.train.seed, bootstrap, markers, sinkhorn)):
                store.upsert_metrics(metric_rows(result.run_id, key, rows, step))
                written += len(rows)
    finally:
        store.close()
    return written
