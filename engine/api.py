"""The Python API, mirroring the CLI: `engine.fit(...)` trains and returns a `FitResult`.

    result = engine.fit("cells.h5ad", condition_key="drug", control="ctrl", solver="cellot")
    result.metrics()                 # DataFrame: per map, model / identity / observed
    result.predict(new_controls)     # AnnData of predicted cells
    FitResult.load("runs/x")         # a run directory is the saved result
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import anndata as ad
import numpy as np
import pandas as pd
import torch

from engine.config import ClusterConfig, RunConfig
from engine.data import DataError, DataSpec, MapKey, PreparedData, prepare, read_h5ad
from engine.store import Store
from engine.train.loop import TrainConfig
from engine.train.maps import load_maps, predict_cells

ProgressFn = Callable[[int, int, int, int], None]


class FitResult:
    """A finished run: its directory (config.yaml, checkpoints/, predictions.h5ad) and its store."""

    def __init__(self, run_dir: str | Path, store_url: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        info = json.loads((self.run_dir / "run.json").read_text())
        self.run_id: str = info["run_id"]
        self.store_url: str = store_url or info["store"]
        self.config = RunConfig.load(self.run_dir / "config.yaml")

    @classmethod
    def load(cls, run_dir: str | Path, store_url: str | None = None) -> "FitResult":
        if not (Path(run_dir) / "run.json").exists():
            raise DataError(f"{run_dir} is not a perturbot run directory (no run.json)")
        return cls(run_dir, store_url)

    def save(self, destination: str | Path) -> "FitResult":
        """Copy the run directory (maps, data layout, config, its SQLite store) to destination."""
        shutil.copytree(self.run_dir, destination, dirs_exist_ok=True)
        local = self.store_url == _default_store(self.run_dir)
        return FitResult(destination, _default_store(Path(destination)) if local else self.store_url)

    def _store_query(self, method: str, **kwargs: Any) -> pd.DataFrame:
        store = Store(self.store_url)
        try:
            return getattr(store, method)(self.run_id, **kwargs)
        finally:
            store.close()

    def metrics(self, split: str | None = None, metric: str | None = None) -> pd.DataFrame:
        """Metric rows of this run (columns of the store's metrics table)."""
        return self._store_query("metrics", split=split, metric=metric)

    def maps(self) -> pd.DataFrame:
        """One row per map: status, steps, best step, checkpoint, error."""
        return self._store_query("maps")

    def predict(self, adata: ad.AnnData, perturbations: list[str] | None = None) -> ad.AnnData:
        """Map every cell of `adata` (control cells) through each trained map, or the maps named."""
        prepared = PreparedData.load(self.run_dir / "data")
        x = prepared.encode_controls(adata).astype(np.float32)
        known = {k.name: k for k in prepared.maps}
        wanted = set(perturbations or known)
        unknown = sorted(wanted - set(known))
        if unknown:
            raise DataError(f"unknown map(s) {', '.join(unknown)}; this run has {', '.join(sorted(known))}")
        parts = []
        for path in sorted((self.run_dir / "checkpoints").glob("*.maps.pt")):
            solver, names = load_maps(path)
            for name, (cells, weights) in zip(names, predict_cells(solver, [x] * len(names), torch.device("cpu"))):
                if name in wanted:
                    if prepared.embedding is not None:
                        cells = prepared.embedding.decode(cells)
                    parts.append(prediction_frame(prepared, known[name], cells, weights, list(map(str, adata.obs_names))))
        if not parts:
            raise DataError(f"none of the requested maps were trained in {self.run_dir}")
        return ad.concat(parts)


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


def _default_store(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir / 'metrics.sqlite').resolve()}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run(config: RunConfig, run_dir: str | Path, store_url: str | None = None,
        adata: ad.AnnData | None = None, on_progress: ProgressFn | None = None) -> FitResult:
    """Prepare the data, train every map on Ray (one TorchTrainer fit), write predictions and the store."""
    from engine.cluster.runtime import connect
    from engine.cluster.trainer import run_training

    run_dir = Path(run_dir)
    if (run_dir / "run.json").exists():
        raise DataError(f"{run_dir} already holds a run; choose another --out")
    adata = read_h5ad(config.dataset) if adata is None else adata
    prepared = prepare(adata, config.data)
    run_dir.mkdir(parents=True, exist_ok=True)
    store_url = store_url or _default_store(run_dir)
    run_id = f"{config.solver}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    config.save(run_dir / "config.yaml")
    prepared.save(run_dir / "data")
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_id, "store": store_url}))
    dataset = Path(config.dataset)
    store = Store(store_url)
    store.start_run(run_id, "train", config.solver, dataset.name,
                    _sha256(dataset) if dataset.is_file() else "", config.to_dict())
    store.upsert_maps([{"run_id": run_id, "perturbation": k.name, "status": "pending"} for k in prepared.maps])
    status = "failed"
    try:
        connect(config.cluster.address)
        run_training(config, prepared, run_dir, run_id, store_url, on_progress)
        write_predictions(run_dir, prepared)
        maps = store.maps(run_id)
        status = "finished" if (maps["status"].isin(["trained", "diverged"])).all() else "partial"
    finally:
        store.finish_run(run_id, status)
        store.close()
    return FitResult(run_dir, store_url)


def write_predictions(run_dir: Path, prepared: PreparedData) -> Path:
    """predictions.h5ad: the held-out controls of every map, predicted (one row per cell and map)."""
    keys = {k.name: k for k in prepared.maps}
    parts = []
    for path in sorted((run_dir / "predictions").glob("*.npz")):
        with np.load(path) as saved:
            for i, name in enumerate(saved["maps"]):
                key = keys[str(name)]
                sources = prepared.cell_names(key.group, prepared.spec.control, "test")
                weights = saved[f"weights/{i}"] if f"weights/{i}" in saved else None
                parts.append(prediction_frame(prepared, key, saved[f"cells/{i}"], weights, sources))
    out = run_dir / "predictions.h5ad"
    if parts:
        ad.concat(parts).write_h5ad(out)
    return out


def fit(
    data: str | Path | ad.AnnData,
    *,
    condition_key: str,
    control: str,
    solver: str = "cellot",
    perturbations: list[str] | None = None,
    split_by: str | None = None,
    holdout: tuple[str, str] | None = None,
    preprocess: str = "none",
    embed: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    solver_params: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    address: str = "local",
    out: str | Path | None = None,
    store: str | None = None,
    on_progress: ProgressFn | None = None,
) -> FitResult:
    """Train one map per (group, perturbation) and return the run (see the CLI's `train`)."""
    adata = data if isinstance(data, ad.AnnData) else None
    dataset = "<in-memory AnnData>" if adata is not None else str(data)
    train_config = TrainConfig(**{**(train or {}), "seed": seed, **({"steps": steps} if steps is not None else {})})
    config = RunConfig(
        dataset=dataset,
        data=DataSpec(condition_key=condition_key, control=control, perturbations=perturbations,
                      split_by=split_by, holdout=holdout, preprocess=preprocess, embed=embed, seed=seed),
        solver=solver,
        solver_params=solver_params or {},
        train=train_config,
        cluster=ClusterConfig(address=address, workers=workers, gpus_per_worker=gpus_per_worker),
    )
    run_dir = Path(out) if out is not None else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    return run(config, run_dir, store, adata, on_progress)
