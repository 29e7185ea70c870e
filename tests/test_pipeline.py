"""End to end on local Ray: synthetic h5ad -> stacked CellOT on 2 workers -> store, predictions, API."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.api import FitResult, fit
from engine.data import make_synthetic
from engine.store import Store


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    adata = make_synthetic(n_perturbations=2, n_groups=2, dim=6, n_cells=300, seed=1)
    path = tmp_path_factory.mktemp("data") / "synthetic.h5ad"
    adata.write_h5ad(path)
    out = tmp_path_factory.mktemp("runs") / "run"
    seen = []
    result = fit(path, condition_key="condition", control="control", split_by="group", steps=60,
                 train={"eval_every": 30, "stack_size": 1}, workers=2, out=out,
                 on_progress=lambda *p: seen.append(p))
    return result, adata, seen


def test_every_map_is_trained_and_stored(trained):
    result, _, seen = trained
    maps = result.maps()
    assert sorted(maps["perturbation"]) == ["g0/pert0", "g0/pert1", "g1/pert0", "g1/pert1"]
    assert (maps["status"] == "trained").all()
    assert (maps["steps"] == 60).all()
    assert seen and seen[-1][3] == 4  # progress reported over 4 stacks (stack_size 1)
    store = Store(result.store_url)
    runs = store.runs()
    store.close()
    assert runs.loc[runs["run_id"] == result.run_id, "status"].item() == "finished"


def test_final_metrics_have_model_and_baselines(trained):
    result, _, _ = trained
    final = result.metrics(metric="mmd")
    table = final[final["split"].str.startswith("test")].pivot_table(index="perturbation", columns="split", values="value")
    assert set(table.columns) == {"test", "test_identity", "test_observed", "test_mean_shift", "test_gaussian"}
    assert len(table) == 4 and np.isfinite(table.to_numpy()).all()
    valid = result.metrics(split="valid", metric="mmd")
    assert sorted(valid["step"].unique()) == [0, 30, 60]


def test_summary_and_the_selection_protocol_in_the_store(trained):
    result, _, _ = trained
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

    result, adata, _ = trained
    predictions = ad.read_h5ad(result.run_dir / "predictions.h5ad")
    assert {"source_cell", "perturbation", "group"} <= set(predictions.obs.columns)
    assert list(predictions.var_names) == list(adata.var_names)
    assert predictions.uns["perturbot"]["run_id"] == result.run_id
    controls = adata[(adata.obs["condition"] == "control") & (adata.obs["group"] == "g1")][:25]
    predicted = FitResult.load(result.run_dir).predict(controls, ["g1/pert0"])
    assert predicted.n_obs == 25 and set(predicted.obs["source_cell"]) == set(controls.obs_names)
    assert np.isfinite(predicted.X).all()
    assert not np.allclose(predicted.X, controls.X)  # the map moved the cells
