"""End to end on local Ray: synthetic h5ad -> stacked CellOT on 2 workers -> store, predictions, API.

The run is stopped by a KeyboardInterrupt (Ctrl-C) once training has started, then resumed: every
test below checks the resumed run, which must equal a run that never stopped. Its storage location
is a pyarrow filesystem that is not the local one (RecordingFileSystem: local files, every write
logged with the writing process), so the object-store code path (s3://, gs://) is the one exercised.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from engine.api import FitResult, fit
from engine.data import PreparedData, make_synthetic
from engine.storage import StoragePath
from engine.store import Store


class RecordingFileSystem(pafs.FileSystemHandler):
    """A pyarrow filesystem handler over the local disk that appends "pid op path" to `log` for every
    write (files and folders made, moved, deleted), from whichever process writes."""

    def __init__(self, log: str) -> None:
        self.log, self.local = log, pafs.LocalFileSystem()

    def _record(self, op: str, *paths: str) -> None:
        with open(self.log, "a") as out:
            out.write("".join(f"{os.getpid()} {op} {p}\n" for p in paths))

    def get_type_name(self) -> str:
        return "recording"

    def normalize_path(self, path: str) -> str:
        return path

    def equals(self, other: object) -> bool:
        return isinstance(other, RecordingFileSystem) and other.log == self.log

    def get_file_info(self, paths: list[str]) -> list:
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list:
        return self.local.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self._record("mkdir", path)
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self._record("delete", path)
        self.local.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._record("delete", path)
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to empty the root")

    def delete_file(self, path: str) -> None:
        self._record("delete", path)
        self.local.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self._record("move", src, dest)
        self.local.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self._record("copy", dest)
        self.local.copy_file(src, dest)

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.local.open_input_stream(path)

    def open_input_file(self, path: str) -> pa.NativeFile:
        return self.local.open_input_file(path)

    def open_output_stream(self, path: str, metadata: dict | None = None) -> pa.NativeFile:
        self._record("write", path)
        return self.local.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: dict | None = None) -> pa.NativeFile:
        self._record("write", path)
        return self.local.open_append_stream(path, metadata=metadata)


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    adata = make_synthetic(n_perturbations=2, n_groups=2, dim=6, n_cells=300, seed=1)
    path = tmp_path_factory.mktemp("data") / "synthetic.h5ad"
    adata.write_h5ad(path)
    out = tmp_path_factory.mktemp("runs") / "run"
    writes = tmp_path_factory.mktemp("log") / "writes.log"
    folder = tmp_path_factory.mktemp("storage")  # what workers write goes here, not into the run directory
    storage = StoragePath(pafs.PyFileSystem(RecordingFileSystem(str(writes))), str(folder))
    options = dict(condition_key="condition", control="control", split_by="group", steps=STEPS,
                   train={"eval_every": STEPS // 2, "stack_size": 1}, workers=2, out=out)
    seen = []

    def ctrl_c(progress):
        seen.append(progress)
        if progress.map_steps > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(path, on_progress=ctrl_c, storage=storage, **options)
    with Store(out / "metrics.sqlite") as store:
        stopped = {"runs": store.runs(), "maps": store.maps(store.runs()["run_id"].item())}
    stopped["checkpoints"] = sorted(p.name for p in (storage / "checkpoints").glob("*.train.pt"))
    bar = io.StringIO()
    with contextlib.redirect_stderr(bar):  # engine.fit's own progress bar
        result = fit(path, resume=True, storage=storage, **options)
    return result, adata, seen, stopped, bar.getvalue(), folder, writes


def test_workers_write_only_into_the_storage_location(trained):
    """--storage: cells, checkpoints, maps and per-stack predictions are in the storage location,
    written through its filesystem (every file there was, and every write went there; the workers
    wrote the maps and predictions, the driver collected them); the run directory holds what the
    driver writes (config, run.json, predictions.h5ad, the store)."""
    result, folder, writes = trained[0], trained[5], trained[6]
    assert {p.name for p in result.run_dir.iterdir()} <= {"config.yaml", "run.json", "predictions.h5ad",
                                                         "metrics.sqlite", "metrics.sqlite-wal", "metrics.sqlite-shm"}
    assert {p.name for p in folder.iterdir()} == {"data", "checkpoints", "predictions", "ray"}
    logged = [line.split(" ", 2) for line in writes.read_text().splitlines()]
    written = {Path(path) for _, op, path in logged}
    assert all(path == folder or folder in path.parents for path in written), sorted(written)
    on_disk = {path for path in folder.rglob("*") if path.is_file()}
    assert on_disk <= written, sorted(on_disk - written)
    by_workers = {Path(path).name for pid, op, path in logged if int(pid) != os.getpid()}
    assert sum(name.endswith(".maps.pt") for name in by_workers) == 4, by_workers
    assert sum(name.endswith(".npz") for name in by_workers) == 4, by_workers
    assert len(result.dir.saved_maps()) == 4
    predicted = ad.read_h5ad(result.run_dir / "predictions.h5ad")
    assert predicted.obs["perturbation"].nunique() == 2 and predicted.obs["group"].nunique() == 2


STEPS = 100


def test_a_stopped_run_marks_its_maps_interrupted(trained):
    """Ctrl-C: the run and every unfinished map are `interrupted` (never left running), the running
    stacks checkpointed where they stopped."""
    _, _, seen, stopped, _, *_ = trained
    assert stopped["runs"]["status"].item() == "interrupted"
    assert set(stopped["maps"]["status"]) <= {"interrupted", "trained"}
    assert "interrupted" in set(stopped["maps"]["status"])
    assert stopped["checkpoints"]  # the stacks that were training saved their step
    assert seen[-1].map_steps_total == 4 * STEPS and seen[-1].maps == 4  # counted in map-steps


def test_resume_finishes_from_the_checkpoints_not_from_step_0(trained):
    result, _, _, stopped, bar, *_ = trained
    resumed = result.metrics(metric="resumed_from")
    assert len(resumed) >= len(stopped["checkpoints"]) > 0
    assert (resumed["value"] > 0).all() and (resumed["value"] < STEPS).all()
    final = result.metrics()
    final = final[final["split"].str.startswith("test")]
    per_map = final.groupby(["perturbation", "split", "metric"]).size()
    assert (per_map == 1).all()  # one final row set per map, no duplicate
    assert final.groupby("perturbation").size().nunique() == 1 and final["perturbation"].nunique() == 4
    assert "training cellot: maps" in bar and "4/4" in bar.splitlines()[-1]


def test_every_map_is_trained_and_stored(trained):
    result, _, _, _, _, *_ = trained
    maps = result.maps()
    assert sorted(maps["perturbation"]) == ["g0/pert0", "g0/pert1", "g1/pert0", "g1/pert1"]
    assert (maps["status"] == "trained").all()
    assert (maps["steps"] == STEPS).all()
    store = Store(result.store_url)
    runs = store.runs()
    store.close()
    assert runs.loc[runs["run_id"] == result.run_id, "status"].item() == "finished"


def test_a_finished_run_is_not_run_again_and_resume_keeps_its_settings(trained, capsys):
    from engine.cli import main

    result, _, _, _, _, *_ = trained
    args = ["train", "--data", result.config.dataset, "--condition-key", "condition", "--control", "control",
            "--split-by", "group", "--out", str(result.run_dir)]
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--steps", "7", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.steps" in err and err.count("\n") == 1


def test_metrics_into_a_closed_pipe_is_quiet(trained):
    """`perturbot metrics | head`: the reader goes away; no BrokenPipeError, no traceback."""
    result, _, _, _, _, *_ = trained
    process = subprocess.Popen([sys.executable, "-m", "engine.cli", "metrics", "--run", str(result.run_dir), "--raw"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before it writes: every write meets a closed pipe
    err = process.stderr.read().decode()
    assert process.wait(60) == 141 and err == "", err


def test_final_metrics_have_model_and_baselines(trained):
    result, _, _, _, _, *_ = trained
    final = result.metrics(metric="mmd")
    table = final[final["split"].str.startswith("test")].pivot_table(index="perturbation", columns="split", values="value")
    assert set(table.columns) == {"test", "test_identity", "test_observed", "test_mean_shift", "test_gaussian"}
    assert len(table) == 4 and np.isfinite(table.to_numpy()).all()
    valid = result.metrics(split="valid", metric="mmd")
    assert sorted(valid["step"].unique()) == [0, STEPS // 2, STEPS]


def test_summary_and_the_selection_protocol_in_the_store(trained):
    result, _, _, _, _, *_ = trained
    summary = result.summary()
    assert list(summary.columns) == ["perturbation", "metric", "model", "identity", "observed", "mean_shift", "gaussian"]
    assert set(summary["perturbation"]) == {"g0/pert0", "g0/pert1", "g1/pert0", "g1/pert1"}
    assert {"mmd", "mmd50", "l2_means", "energy"} <= set(summary["metric"])
    assert result.succeeded()
    store = Store(result.store_url)
    runs = store.runs()
    store.close()
    config = json.loads(runs.loc[runs["run_id"] == result.run_id, "config_json"].item())
    assert config["data"]["select_on"] == "valid" and config["data"]["valid_fraction"] == 0.1


def test_predictions_file_and_predict(trained):
    import anndata as ad

    result, adata, _, _, _, *_ = trained
    predictions = ad.read_h5ad(result.run_dir / "predictions.h5ad")
    assert {"source_cell", "perturbation", "group"} <= set(predictions.obs.columns)
    assert list(predictions.var_names) == list(adata.var_names)
    assert predictions.uns["perturbot"]["run_id"] == result.run_id
    controls = adata[(adata.obs["condition"] == "control") & (adata.obs["group"] == "g1")][:25]
    predicted = FitResult.load(result.run_dir).predict(controls, ["g1/pert0"])
    assert predicted.n_obs == 25 and set(predicted.obs["source_cell"]) == set(controls.obs_names)
    assert np.isfinite(predicted.X).all()
    assert not np.allclose(predicted.X, controls.X)  # the map moved the cells


def test_predictions_file_holds_each_maps_test_controls_predicted(trained):
    """predictions.h5ad (written one stack at a time): per map, its group's test controls in table
    order, moved as `predict` moves them."""
    result, adata, _, _, _, *_ = trained
    predictions = ad.read_h5ad(result.run_dir / "predictions.h5ad")
    prepared = PreparedData.load(result.dir.data)
    assert predictions.n_obs == sum(prepared.table_rows[(k.group, "control", "test")] for k in prepared.maps)
    for key in prepared.maps:
        rows = predictions[predictions.obs["perturbation"] == key.perturbation]
        rows = rows[rows.obs["group"] == key.group]
        sources = prepared.cell_names(key.group, "control", "test")
        assert list(rows.obs["source_cell"]) == sources and list(rows.obs_names) == [f"{key.name}:{c}" for c in sources]
        again = result.predict(adata[sources], [key.name])
        np.testing.assert_allclose(rows.X, again.X, rtol=1e-5, atol=1e-5)
