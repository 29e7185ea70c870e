"""Final evaluation of trained maps on test cells, beside their baselines.

Each map predicts its test controls (with its context); so do the closed-form `mean_shift` and
`gaussian` (Bures) maps fitted on the same training cells. The predictions are decoded to data space
when the run trained in a latent, and scored against the map's test perturbed cells on its marker
features (engine.metrics.evaluate_map), beside the identity and observed baselines. Test cells
never influence training: selection reads the valid split (unless the run chose `select_on: test`,
CellOT's protocol).
"""
from __future__ import annotations

import numpy as np
import torch

from engine.data import MapKey, PreparedData
from engine.data.contexts import map_contexts
from engine.metrics.evaluate import MetricRow, evaluate_map
from engine.solvers import StackSolver, build_solver
from engine.train.saved_maps import predict_cells
from engine.train.stack import nearest_trained, trained_maps
from engine.train.stack_data import StackData, map_seed

BASELINE_MAPS = ("mean_shift", "gaussian")  # fitted per map, scored as split test_<name>

Evaluated = tuple[list[MetricRow], np.ndarray, np.ndarray | None]


def evaluate_maps(
    prepared: PreparedData,
    keys: list[MapKey],
    solver: StackSolver,
    data: StackData,
    seed: int,
    *,
    bootstrap: int = 0,
    markers: int | None = None,
    sinkhorn: bool = False,
) -> list[Evaluated]:
    """Predict each map's test controls and score them: [(rows, predicted cells (data space), weights)].

    `data` is the stack's training data (of trained_maps(keys)): its contexts go to the maps, its
    training cells fit the baseline maps, its device runs the predictions. A held-out context (a map
    of `keys` without training cells, for a shared solver) is predicted with its own context, and its
    observed, mean_shift and gaussian baselines are those of the trained map with the nearest context
    (e.g. the nearest seen dose). The metrics' subsamples are seeded per map (run seed and map name), so the same run scores the
    same whatever the stack, the device or the options (bootstrap, sinkhorn) asked for.
    """
    control = prepared.spec.control
    sources = [prepared.cells(k.group, control, "test") for k in keys]
    trained = trained_maps(prepared, keys)
    contexts, fitted_on = data.contexts, list(range(len(keys)))
    if len(trained) < len(keys):
        contexts = torch.from_numpy(map_contexts(prepared, keys)).to(data.device)
        fitted_on = nearest_trained(prepared, keys)

    def decoded(cells: np.ndarray) -> np.ndarray:
        return cells if prepared.embedding is None else prepared.embedding.decode(cells).astype(np.float32)

    baselines = {}
    for name in BASELINE_MAPS:
        baseline = build_solver(name, data.n_maps, data.dim)
        baseline.initialize(data, [])
        if fitted_on != list(range(data.n_maps)):  # a stacked solver: every buffer has the map axis first
            state = {n: t[fitted_on] for n, t in baseline.state_dict().items()}
            baseline = build_solver(name, len(keys), data.dim)
            baseline.load_state_dict(state)
        baseline.to(data.device)
        baselines[f"test_{name}"] = [decoded(c) for c, _ in predict_cells(baseline, sources, data.device)]
    results = []
    for k, (key, (cells, weights)) in enumerate(zip(keys, predict_cells(solver, sources, data.device, contexts))):
        cells = decoded(cells)
        features = prepared.markers.get(key.name)
        if features is not None and markers is not None:
            features = features[:markers]
        rows = evaluate_map(
            cells,
            prepared.cells(key.group, key.perturbation, "test", space="data"),
            prepared.cells(key.group, control, "test", space="data"),
            prepared.cells(trained[fitted_on[k]].group, trained[fitted_on[k]].perturbation, "train", space="data"),
            features=features,
            pred_weights=weights,
            bootstrap=bootstrap,
            seed=map_seed(seed, key.name),
            sinkhorn=sinkhorn,
            baselines={split: predicted[k] for split, predicted in baselines.items()},
        )
        results.append((rows, cells, weights))
    return results


def metric_rows(run_id: str, key: MapKey, rows: list[MetricRow], step: int) -> list[dict]:
    """Store rows (metrics table) of one map's evaluation."""
    return [{"run_id": run_id, "perturbation": key.name, "split": r.split, "metric": r.metric,
             "value": r.value, "step": step} for r in rows]
