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
import io
import json
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch
from anndata.io import write_elem

from engine.config import RunConfig
from engine.data import DataError, MapKey, PreparedData, prepare, read_h5ad
from engine.data.contexts import context_map, map_contexts
from engine.data.prepared import read_tables
from engine.progress import ProgressBar, ProgressFn
from engine.rundir import RunDir, default_run_dir
from engine.storage import PathLike
from engine.store import Store
from engine.train.evaluation import BASELINE_MAPS, evaluate_maps, metric_rows
from engine.train.saved_maps import SavedMaps, predict_cells
from engine.train.stack import stack_data

FINAL_SPLITS = {"test": "model", "test_identity": "identity", "test_observed": "observed",
                **{f"test_{name}": name for name in BASELINE_MAPS}}
DONE = ("trained", "diverged")  # map statuses of a finished map
PREDICTION_COLUMNS = ("source_cell", "perturbation", "group", "weight")  # obs columns of a prediction
UNFINISHED = ("pending", "running")  # statuses that only a live run may show


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

    def predict(self, adata: ad.AnnData, perturbations: list[str] | None = None, groups: list[str] | None = None,
                on_note: Callable[[str], None] | None = None, context: dict[str, str] | None = None) -> ad.AnnData:
        """Predict perturbed cells from the control cells of `adata`, without retraining.

        Which maps see which cells: when the run was split by a key (`--split-by`) that `adata.obs`
        also has, each cell goes through the maps of its own group; `groups` sends every cell through
        those groups' maps instead; otherwise every cell goes through every map. `perturbations`
        (map names) narrows the maps. A conditional run (condot) predicts any `context` instead, e.g.
        {"dose": "3000"} (a label per context key, unseen values included): every cell through that
        one map. The rows carry the source cell's obs columns (a clashing
        name gets a "source_" prefix), `uns['perturbot']` the run id, solver and config. `on_note`
        (default: warnings.warn) hears about cells that are not controls or that no map takes.
        """
        note = on_note or (lambda message: warnings.warn(message, stacklevel=3))
        prepared, stacks = self._saved()
        spec = prepared.spec
        if context is not None and (perturbations or groups):
            raise DataError("--context names the one map to predict; give it without --perturbations or --groups")
        known = {k.name: k for k in prepared.maps}
        wanted = set(perturbations or known)
        unknown = sorted(wanted - set(known))
        if unknown:
            raise DataError(f"unknown map(s) {', '.join(unknown)}; this run has {', '.join(sorted(known))}")
        if spec.condition_key in adata.obs:
            treated = int((adata.obs[spec.condition_key].astype(str) != spec.control).sum())
            if treated:
                note(f"{treated} of {adata.n_obs} input cells are not controls (obs[{spec.condition_key!r}] != "
                     f"{spec.control!r}); they are mapped as if they were")
        x = prepared.encode_controls(adata).astype(np.float32)
        source_obs = adata.obs.rename(columns=lambda c: f"source_{c}" if c in PREDICTION_COLUMNS else c)

        def with_source(key: MapKey, cells: np.ndarray, weights: np.ndarray | None, rows: np.ndarray) -> ad.AnnData:
            """One map's predicted cells (decoded to data space) with their source cells' obs."""
            if prepared.embedding is not None:
                cells = prepared.embedding.decode(cells)
            frame = prediction_frame(prepared, key, cells, weights, list(map(str, adata.obs_names[rows])))
            frame.obs = frame.obs.join(source_obs.iloc[rows].set_index(frame.obs.index))
            return frame

        parts = []
        if context is not None:
            key, vector = self._context_map(prepared, stacks, context)
            ((cells, weights),) = predict_cells(stacks[0].solver, [x], stacks[0].device, vector)
            parts.append(with_source(key, cells, weights, np.arange(adata.n_obs)))
        else:
            cells_of = self._cells_per_group(adata, prepared, groups, wanted, known, note)
            for saved in stacks:
                rows_of = [cells_of(known[n]) if n in wanted else np.arange(0) for n in saved.names]
                if not any(len(rows) for rows in rows_of):
                    continue
                predicted = predict_cells(saved.solver, [x[rows] for rows in rows_of], saved.device, saved.contexts)
                for name, rows, (cells, weights) in zip(saved.names, rows_of, predicted):
                    if len(rows):
                        parts.append(with_source(known[name], cells, weights, rows))
        if not parts:
            raise DataError(f"no cell of the input goes through a requested map of {self.run_dir}")
        predicted = ad.concat(parts)
        predicted.uns["perturbot"] = self.provenance()
        return predicted

    @staticmethod
    def _cells_per_group(adata: ad.AnnData, prepared: PreparedData, groups: list[str] | None, wanted: set[str],
                         known: dict[str, MapKey], note: Callable[[str], None]) -> Callable[[MapKey], np.ndarray]:
        """Row indices of `adata` that each map takes (see `predict`)."""
        everyone = np.arange(adata.n_obs)
        key = prepared.spec.split_by
        trained_groups = sorted({k.group for k in prepared.maps if k.group is not None})
        if groups is not None:
            missing = sorted(set(groups) - set(trained_groups))
            if missing:
                raise DataError(f"unknown group(s) {', '.join(missing)}; this run has {', '.join(trained_groups) or 'none'}")
            return lambda k: everyone if k.group in groups else everyone[:0]
        if key is None or key not in adata.obs:
            if key is not None:
                note(f"obs has no {key!r} column: every cell goes through the maps of every group "
                     f"({', '.join(trained_groups)}); give --groups to choose")
            return lambda k: everyone
        labels = adata.obs[key].astype(str).to_numpy()
        reached = {k.group for name, k in known.items() if name in wanted}
        stray = ~np.isin(labels, list(reached))
        if stray.any():
            note(f"{int(stray.sum())} of {adata.n_obs} input cells belong to groups without a requested map "
                 f"(obs[{key!r}] in {', '.join(sorted(set(labels[stray])))}); --groups sends cells through other groups' maps")
        return lambda k: everyone[labels == k.group]

    def provenance(self) -> dict[str, str]:
        """What a prediction file records of its run (AnnData uns['perturbot'])."""
        return {"run_id": self.run_id, "solver": self.config.solver, "run_dir": str(self.run_dir),
                "config_json": json.dumps(self.config.to_dict())}

    def _context_map(self, prepared: PreparedData, stacks: list[SavedMaps],
                     context: dict[str, str]) -> tuple[MapKey, torch.Tensor]:
        """The map of a conditional run's `context` (see `predict`) and its context vector [1, c]."""
        if not stacks or not stacks[0].solver.shared:
            raise DataError(f"--context needs a conditional run (condot); {self.run_dir} has one map per perturbation")
        key = context_map(prepared.spec, prepared.maps, context)
        return key, torch.from_numpy(map_contexts(prepared, [key]))

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
    """Predicted cells of one map (already in data space) as AnnData with the input's var names;
    obs['weight'] is the predicted weight per cell (NubOT's eta / zeta, 1 for balanced maps) times
    the map's observed cell-count ratio when the run was given growth factors (`--growth`)."""
    obs = pd.DataFrame(
        {"source_cell": sources, "perturbation": key.perturbation},
        index=[f"{key.name}:{s}" for s in sources],
    )
    if key.group is not None:
        obs["group"] = key.group
    relative = np.ones(len(sources), np.float32) if weights is None else np.asarray(weights, np.float32)
    obs["weight"] = relative * np.float32(prepared.spec.growth_of(key))
    return ad.AnnData(X=np.asarray(cells, np.float32), obs=obs, var=pd.DataFrame(index=prepared.features))


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, or "" when it is not a file (e.g. in-memory AnnData)."""
    if not path.is_file():
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run(config: RunConfig, run_dir: str | Path, store_url: str | None = None, adata: ad.AnnData | None = None,
        on_progress: ProgressFn | None = None, resume: bool = False, storage: PathLike | None = None) -> FitResult:
    """Prepare the data, train every map on Ray (one TorchTrainer fit), write predictions and the store.

    A run_dir that already holds a run is an error unless `resume` (then: resume_run, with `config`
    checked against the run's own). `storage`: where the prepared cells, checkpoints, maps and
    per-stack predictions go (engine.rundir; default the run directory)."""
    directory = RunDir(run_dir, storage)
    if directory.exists():
        if not resume:
            raise DataError(f"{run_dir} already holds a run; finish it with `perturbot train --resume {run_dir}` "
                            "or choose another --out")
        return resume_run(directory.root, config, store_url, on_progress, storage)
    prepared = prepare(read_h5ad(config.dataset) if adata is None else adata, config.data)
    placed = dataclasses.replace(config, cluster=_place(config, len(prepared.maps)))
    directory.root.mkdir(parents=True, exist_ok=True)
    store_url = store_url or directory.default_store
    run_id = f"{config.solver}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    config.save(directory.config)
    prepared.save(directory.data)
    prepared = prepared.layout()  # from here on the driver holds no cells (README "Placement and memory")
    directory.write_info(run_id, store_url)
    dataset = Path(config.dataset)
    with Store(store_url) as store:
        store.start_run(run_id, "train", config.solver, dataset.name,
                        file_sha256(dataset), config.to_dict())
        store.upsert_maps([{"run_id": run_id, "perturbation": k.name, "status": "pending"} for k in prepared.maps])
    return _train(placed, prepared, directory, run_id, store_url, on_progress)


def resume_run(run_dir: str | Path, config: RunConfig | None = None, store_url: str | None = None,
               on_progress: ProgressFn | None = None, storage: PathLike | None = None) -> FitResult:
    """Finish a stopped run (interrupted, killed, failed): finished stacks (their maps file exists)
    are kept, the others resume from their last checkpoint; maps that failed are tried again.

    The run's own config.yaml is used; a `config` given (the same train command with --resume) must
    equal it but for cluster.address (a run may resume on another cluster). `storage`: the run's
    storage location, by default the one run.json names (give it for a filesystem object, which
    run.json cannot name).
    """
    directory = RunDir(run_dir, storage)
    if not directory.exists():
        raise DataError(f"{run_dir} holds no run to resume (no run.json)")
    saved = RunConfig.load(directory.config)
    if config is not None:
        differences = _differences(saved.to_dict(), config.to_dict(), ignore={"cluster.address"})
        if differences:
            raise DataError(f"{run_dir} was run with other settings ({', '.join(differences)}); resume it with "
                            f"`perturbot train --resume {run_dir}` alone or choose another --out")
        saved = dataclasses.replace(saved, cluster=dataclasses.replace(saved.cluster, address=config.cluster.address))
    info = directory.read_info()
    prepared = PreparedData.load(directory.data, tables=())
    placed = dataclasses.replace(saved, cluster=_place(saved, len(prepared.maps)))
    store_url = store_url or info["store"]
    with Store(store_url) as store:
        maps = store.maps(info["run_id"])
        store.restart_run(info["run_id"])
        store.upsert_maps([{"run_id": info["run_id"], "perturbation": name, "status": "pending", "error": None}
                           for name in maps.loc[~maps["status"].isin(DONE), "perturbation"]])
    return _train(placed, prepared, directory, info["run_id"], store_url, on_progress)


def _differences(a: dict[str, Any], b: dict[str, Any], ignore: set[str], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        if name in ignore:
            continue
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += _differences(a[key], b[key], ignore, f"{name}.")
        elif a.get(key) != b.get(key):
            out.append(name)
    return out


def _place(config: RunConfig, n_maps: int) -> Any:
    from engine.cluster.runtime import connect_for

    return connect_for(config, n_maps)


def _train(placed: RunConfig, prepared: PreparedData, directory: RunDir, run_id: str, store_url: str,
           on_progress: ProgressFn | None) -> FitResult:
    """Train the run's unfinished stacks; however it ends, no map of it stays pending or running
    (a stopped run's are `interrupted`, for `resume_run`) and the run gets its final status."""
    from engine.cluster.trainer import run_training

    status = "failed"
    with Store(store_url) as store:
        try:
            run_training(placed, prepared, directory, run_id, store_url, on_progress)
            write_predictions(directory, prepared)
            status = "finished" if all_done(store.maps(run_id)) else "partial"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            maps = store.maps(run_id)
            store.upsert_maps([{"run_id": run_id, "perturbation": name, "status": "interrupted"}
                               for name in maps.loc[maps["status"].isin(UNFINISHED), "perturbation"]])
            store.finish_run(run_id, status)
    return FitResult(directory.root, store_url)


def write_predictions(directory: RunDir, prepared: PreparedData) -> Path:
    """predictions.h5ad: the test controls of every map, predicted (one row per cell and map).

    Streamed: one stack's predicted cells at a time are appended to X on disk, so the driver holds
    one stack's cells, the test-control names of the groups seen so far and the obs table (about 100
    bytes a row), which is written last; the file is written beside the target, then moved onto it.
    """
    files = directory.all_stack_predictions()
    if not files:
        return directory.predictions
    keys = {k.name: k for k in prepared.maps}
    names: dict[str | None, list[str]] = {}

    def test_controls(group: str | None) -> list[str]:
        if group not in names:
            table = (group or "", prepared.spec.control, "test")
            names[group] = read_tables(directory.data, [table])[table].column("cell").to_pylist()
        return names[group]

    partial = directory.predictions.with_name(directory.predictions.name + ".tmp")
    obs = []
    with h5py.File(partial, "w") as out:
        n_features = len(prepared.features)
        x = out.create_dataset("X", shape=(0, n_features), maxshape=(None, n_features), dtype="float32", chunks=True)
        x.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        for path in files:
            with np.load(io.BytesIO(path.read_bytes())) as saved:
                for i, name in enumerate(saved["maps"]):
                    key = keys[str(name)]
                    weights = saved[f"weights/{i}"] if f"weights/{i}" in saved else None
                    part = prediction_frame(prepared, key, saved[f"cells/{i}"], weights, test_controls(key.group))
                    start = x.shape[0]
                    x.resize(start + part.n_obs, axis=0)
                    x[start:] = part.X
                    obs.append(part.obs)
        rest = ad.AnnData(obs=pd.concat(obs), var=pd.DataFrame(index=prepared.features),
                          uns={"perturbot": FitResult(directory.root).provenance()})
        rest.strings_to_categoricals()  # as write_h5ad does
        for element in ("obs", "var", "uns", "obsm", "varm", "layers", "obsp", "varp"):
            value = getattr(rest, element)
            write_elem(out, element, value if element in ("obs", "var") else dict(value))
        out.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
    partial.replace(directory.predictions)
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
    groups: list[str] | None = None,
    holdout: tuple[str, str | Sequence[str]] | None = None,
    preprocess: str | None = None,
    hvg: int | None = None,
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
    storage: PathLike | None = None,
    resume: bool = False,
    on_progress: ProgressFn | None = None,
    progress: bool = True,
) -> FitResult:
    """Train one map per (group, perturbation) and return the run (see the CLI's `train`).

    `config` is a YAML file (sections data, solver, train, cluster) and `overrides` are `--set`
    style `section.key=value` strings; keyword arguments left at None take the file's value or the
    default (RunConfig.resolve). condition_key and control are required unless the file gives them.
    resume: `out` may hold a stopped run of the same settings, which is finished (resume_run).
    storage: where workers write (default `out`): a path every Ray node sees, an s3:// or gs:// URI, or an
    engine.storage.StoragePath over any pyarrow filesystem (engine.rundir).
    Progress: a live bar on stderr (engine.progress.ProgressBar, as the CLI's), or each
    RunProgress to `on_progress` instead; progress=False shows nothing.
    groups: with split_by, train only these groups' maps (the others' cells are not read).
    holdout: (KEY, VALUE) or (KEY, [VALUE, ...]): the cells with those obs[KEY] labels are the test split.
    context_keys / embeddings: a conditional solver's contexts (["dose"], ["dose=log"]; engine.data.contexts).
    """
    adata = data if isinstance(data, ad.AnnData) else None
    resolved = RunConfig.resolve(
        config, overrides,
        dataset="<in-memory AnnData>" if adata is not None else str(data),
        condition_key=condition_key, control=control, solver=solver, perturbations=perturbations,
        split_by=split_by, groups=groups, holdout=holdout, preprocess=preprocess, hvg=hvg, embed=embed, obsm_key=obsm_key,
        select_on=select_on, context_keys=context_keys, embeddings=embeddings, steps=steps, seed=seed,
        device=device, solver_params=solver_params,
        train_params=train, workers=workers, gpus_per_worker=gpus_per_worker, address=address,
    )
    bar = ProgressBar(f"training {resolved.solver}") if progress and on_progress is None else None
    try:
        return run(resolved, out if out is not None else default_run_dir(), store, adata, on_progress or bar, resume,
                   storage)
    finally:
        if bar is not None:
            bar.close()
