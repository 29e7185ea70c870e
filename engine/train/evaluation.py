"""Final evaluation of trained maps on test cells, beside the identity and observed baselines.

Each map predicts its test controls (with its context); the prediction is decoded to data space
when the run trained in a latent, and scored against the map's test perturbed cells on its marker
features (engine.metrics.evaluate_map). Test cells never influence training: selection reads the
valid split (unless the run chose `select_on: test`, CellOT's protocol).
"""
from __future__ import annotations

import numpy as np
import torch

from engine.data import MapKey, PreparedData
from engine.metrics.evaluate import MetricRow, evaluate_map
from engine.solvers import StackSolver
from engine.train.saved_maps import predict_cells
from engine.train.stack_data import map_seed

Evaluated = tuple[list[MetricRow], np.ndarray, np.ndarray | None]


def evaluate_maps(
    prepared: PreparedData,
    keys: list[MapKey],
    solver: StackSolver,
    device: torch.device,
    seed: int,
    contexts: torch.Tensor | None = None,
    *,
    bootstrap: int = 0,
    markers: int | None = None,
    sinkhorn: bool = False,
) -> list[Evaluated]:
    """Predict each map's test controls and score them: [(rows, predicted cells (data space), weights)].

    The metrics' subsamples are seeded per map (run seed and map name), so the same run scores the
    same whatever the stack, the device or the options (bootstrap, sinkhorn) asked for.
    """
    control = prepared.spec.control
    sources = [prepared.cells(k.group, control, "test") for k in keys]
    results = []
    for key, (cells, weights) in zip(keys, predict_cells(solver, sources, device, contexts)):
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
            seed=map_seed(seed, key.name),
            sinkhorn=sinkhorn,
        )
        results.append((rows, cells, weights))
    return results


def metric_rows(run_id: str, key: MapKey, rows: list[MetricRow], step: int) -> list[dict]:
    """Store rows (metrics table) of one map's evaluation."""
    return [{"run_id": run_id, "perturbation": key.name, "split": r.split, "metric": r.metric,
             "value": r.value, "step": step} for r in rows]
