"""The Python API, mirroring the CLI: `engine.fit(...)` trains and returns a `FitResult`.

    result = engine.fit("cells.h5ad", condition_key="drug", control="ctrl", solver="cellot")
    result.summary()                 # DataFrame: per map and metric, model / identity / observed
    result.predict(new_controls)     # AnnData of predicted cells
    result.evaluate(bootstrap=10)    # score the saved maps again (rows to the store)
    FitResult.load("runs/x")         # a run directory is the saved result
"""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch

from engine.config import RunConfig
from engine.data import DataError, MapKey, PreparedData, prepare, read_h5ad
from engine.data.contexts import context_map, map_contexts
from engine.rundir import RunDir, default_run_dir
from engine.store import Store
from engine.train.evaluation import BASELINE_MAPS, evaluate_maps, metric_rows
from engine.train.saved_maps import SavedMaps, predict_cells
from engine.train.stack import stack_data

ProgressFn = Callable[[int, int, int, int], None]
FINAL_SPLITS = {"test": "model", "test_identity": "identity", "test_observed": "observed",
                **{f"test_{name}": name for name in BASELINE_MAPS}}
DONE = ("trained", "diverged")  # map statuses of a finished map


class FitResult:
    """A finished run: its directory (config.yaml, checkpoints/, predictions.h5ad) and its store."""

    def __init__(self, run_dir: str | Path, store_url: str | None = None) -> None:
        self.dir = RunDir(run_dir)
        info = self.dir.read_info()
        self.run_id: str = info["run_id"]
        self.store_url: str = store_url or info["store"]
        self.config = RunConfig.load(self.dir.config)

    @property
    def run_dir(self) -> Path:
        return self.dir.root

    @classmethod
    def load(cls, run_dir: str | Path, store_url: str | None = None) -> "FitResult":
        if not RunDir(run_dir).exists():
            raise DataError(f"{run_dir} is not a perturbot run directory (no run.json)")
        return cls(run_dir, store_url)

    def save(self, destination: str | Path) -> "FitResult":
        """Copy the run directory (maps, data layout, config, its SQLite store) to destination."""
        shutil.copytree(self.run_dir, destination, dirs_exist_ok=True)
        local = self.store_url == self.dir.default_store
        return FitResult(destination, RunDir(destination).default_store if local else self.store_url)

    def _store_query(self, method: str, **kwargs: Any) -> pd.DataFrame:
        with Store(self.store_url) as store:
            return getattr(store, method)(self.run_id, **kwargs)

    def metrics(self, split: str | None = None, metric: str | None = None) -> pd.DataFrame:
        """Metric rows of this run (columns of the store's metrics table)."""
        return self._store_query("metrics", split=split, metric=metric)

    def maps(self) -> pd.DataFrame:
        """One row per map: status, steps, best step, checkpoint, error."""
        return self._store_query("maps")

    def succeeded(self) -> bool:
        """Every map finished (trained, or diverged and frozen at its best state)."""
        return all_done(self.maps())

    def summary(self, metric: str | None = None) -> pd.DataFrame:
        """Final test metrics, one row per (map, metric), the model beside its baselines (columns
        model, identity, observed, mean_shift, gaussian; NaN where a metric was not computable)."""
        final = self.metrics(metric=metric)
        final = final[final["split"].isin(list(FINAL_SPLITS))]
        columns = ["perturbation", "metric", *FINAL_SPLITS.values()]
        if final.empty:
            return pd.DataFrame(columns=columns)
        table = final.pivot_table(index=["perturbation", "metric"], columns="split", values="value", dropna=False)
        table = table.rename(columns=FINAL_SPLITS).reset_index()
        table.columns.name = None
        return table[[c for c in columns if c in table.columns]]

    def _saved(self) -> tuple[PreparedData, list[SavedMaps]]:
        return PreparedData.load(self.dir.data), [SavedMaps(path) for path in self.dir.saved_maps()]

    def predict(self, adata: ad.AnnData, perturbations: list[str] | None = None,
                context: dict[str, str] | None = None) -> ad.AnnData:
        """Map every cell of `adata` (control cells) through each trained map, or the maps named, or
        (a conditional run) through the map of `context`, e.g. {"dose": "3000"}: a label per context
        key, unseen values included."""
        prepared, stacks = self._saved()
        x = prepared.encode_controls(adata).astype(np.float32)
        sources = list(map(str, adata.obs_names))
        if context is not None:
            return self._predict_context(prepared, stacks, x, sources, context)
        known = {k.name: k for k in prepared.maps}
        wanted = set(perturbations or known)
        unknown = sorted(wanted - set(known))
        if unknown:
            raise DataError(f"unknown map(s) {', '.join(unknown)}; this run has {', '.join(sorted(known))}")
        parts = []
        for saved in stacks:
            predicted = predict_cells(saved.solver, [x] * len(saved.names), saved.device, saved.contexts)
            for name, (cells, weights) in zip(saved.names, predicted):
                if name in wanted:
                    if prepared.embedding is not None:
                        cells = prepared.embedding.decode(cells)
                    parts.append(prediction_frame(prepared, known[name], cells, weights, sources))
        if not parts:
            raise DataError(f"none of the requested maps were trained in {self.run_dir}")
        return ad.concat(parts)

    def _predict_context(self, prepared: PreparedData, stacks: list[SavedMaps], x: np.ndarray, sources: list[str],
                         context: dict[str, str]) -> ad.AnnData:
        if not stacks or not stacks[0].solver.shared:
            raise DataError(f"--context needs a conditional run (condot); {self.run_dir} has one map per perturbation")
        key = context_map(prepared.spec, prepared.maps, context)
        vector = torch.from_numpy(map_contexts(prepared.spec, prepared.maps, [key]))
        ((cells, weights),) = predict_cells(stacks[0].solver, [x], stacks[0].device, vector)
        if prepared.embedding is not None:
            cells = prepared.embedding.decode(cells)
        return prediction_frame(prepared, key, cells, weights, sources)

    def evaluate(self, bootstrap: int = 0, markers: int | None = None, sinkhorn: bool = False) -> int:
        """Score the saved maps again on their test cells (e.g. with bootstrap); rows to the store.
        The rows equal the training run's for the same options (seeded per map). Returns the row count."""
        prepared, stacks = self._saved()
        known = {k.name: k for k in prepared.maps}
        seed = self.config.train.seed
        written = 0
        with Store(self.store_url) as store:
            for saved in stacks:
                keys = [known[n] for n in saved.names]
                step = saved.solver.plan(saved.solver.config, self.config.train.steps).total
                data = stack_data(prepared, keys, self.config, saved.device)
                evaluated = evaluate_maps(prepared, keys, saved.solver, data, seed,
                                          bootstrap=bootstrap, markers=markers, sinkhorn=sinkhorn)
                for key, (rows, _, _) in zip(keys, evaluated):
                    store.upsert_metrics(metric_rows(self.run_id, key, rows, step))
                    written += len(rows)
        return written


def all_done(maps: pd.DataFrame) -> bool:
    """True when there are maps and every one finished (trained, or diverged and frozen)."""
    return len(maps) > 0 and bool(maps["status"].isin(DONE).all())


def prediction_frame(
    prepared: PreparedData, key: MapKey, cells: np.ndarray, weights: np.ndarray | None, sources: list[str]
) -> ad.AnnData:
    """Predicted cells of one map (already in data space) as AnnData with the input's var names."""
    obs = pd.DataFrame(
        {"source_cell": sources, "perturbation": key.perturbation},
        index=[f"{key.name}:{s}" for s in sources],
    )
    if key.group is not None:
        obs["group"] = key.group
    if weights is not None:
        obs["weight"] = weights
    return ad.AnnData(X=np.asarray(cells, np.float32), obs=obs, var=pd.DataFrame(index=prepared.features))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run(config: RunConfig, run_dir: str | Path, store_url: str | None = None,
        adata: ad.AnnData | None = None, on_progress: ProgressFn | None = None) -> FitResult:
    """Prepare the data, train every map on Ray (one TorchTrainer fit), write predictions and the store."""
    from engine.cluster.runtime import connect_for
    from engine.cluster.trainer import run_training

    directory = RunDir(run_dir)
    if directory.exists():
        raise DataError(f"{run_dir} already holds a run; choose another --out")
    adata = read_h5ad(config.dataset) if adata is None else adata
    prepared = prepare(adata, config.data)
    placed = dataclasses.replace(config, cluster=connect_for(config, len(prepared.maps)))
    directory.root.mkdir(parents=True, exist_ok=True)
    store_url = store_url or directory.default_store
    run_id = f"{config.solver}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    config.save(directory.config)
    prepared.save(directory.data)
    directory.write_info(run_id, store_url)
    dataset = Path(config.dataset)
    status = "failed"
    with Store(store_url) as store:
        store.start_run(run_id, "train", config.solver, dataset.name,
                        _sha256(dataset) if dataset.is_file() else "", config.to_dict())
        store.upsert_maps([{"run_id": run_id, "perturbation": k.name, "status": "pending"} for k in prepared.maps])
        try:
            run_training(placed, prepared, directory, run_id, store_url, on_progress)
            write_predictions(directory, prepared)
            status = "finished" if all_done(store.maps(run_id)) else "partial"
        finally:
            store.finish_run(run_id, status)
    return FitResult(directory.root, store_url)


def write_predictions(directory: RunDir, prepared: PreparedData) -> Path:
    """predictions.h5ad: the test controls of every map, predicted (one row per cell and map)."""
    keys = {k.name: k for k in prepared.maps}
    parts = []
    for path in directory.all_stack_predictions():
        with np.load(path) as saved:
            for i, name in enumerate(saved["maps"]):
                key = keys[str(name)]
                sources = prepared.cell_names(key.group, prepared.spec.control, "test")
                weights = saved[f"weights/{i}"] if f"weights/{i}" in saved else None
                parts.append(prediction_frame(prepared, key, saved[f"cells/{i}"], weights, sources))
    if parts:
        ad.concat(parts).write_h5ad(directory.predictions)
    return directory.predictions


def fit(
    data: str | Path | ad.AnnData,
    *,
    condition_key: str | None = None,
    control: str | None = None,
    solver: str | None = None,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    perturbations: list[str] | None = None,
    split_by: str | None = None,
    holdout: tuple[str, str] | None = None,
    preprocess: str | None = None,
    embed: str | None = None,
    obsm_key: str | None = None,
    select_on: str | None = None,
    context_keys: list[str] | None = None,
    embeddings: list[str] | None = None,
    steps: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    solver_params: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    address: str | None = None,
    out: str | Path | None = None,
    store: str | None = None,
    on_progress: ProgressFn | None = None,
) -> FitResult:
    """Train one map per (group, perturbation) and return the run (see the CLI's `train`).

    `config` is a YAML file (sections data, solver, train, cluster) and `overrides` are `--set`
    style `section.key=value` strings; keyword arguments left at None take the file's value or the
    default (RunConfig.resolve). condition_key and control are required unless the file gives them.
    context_keys / embeddings: a conditional solver's contexts (["dose"], ["dose=log"]; engine.data.contexts).
    """
    adata = data if isinstance(data, ad.AnnData) else None
    resolved = RunConfig.resolve(
        config, overrides,
        dataset="<in-memory AnnData>" if adata is not None else str(data),
        condition_key=condition_key, control=control, solver=solver, perturbations=perturbations,
        split_by=split_by, holdout=holdout, preprocess=preprocess, embed=embed, obsm_key=obsm_key,
        select_on=select_on, context_keys=context_keys, embeddings=embeddings, steps=steps, seed=seed,
        device=device, solver_params=solver_params,
        train_params=train, workers=workers, gpus_per_worker=gpus_per_worker, address=address,
    )
    return run(resolved, out if out is not None else default_run_dir(), store, adata, on_progress)
