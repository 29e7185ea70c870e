"""RunConfig.resolve (file < flags < --set), typed settings, the device rule, and what a stack's
selection cells are (valid by default, test only with select_on=test; never both)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from engine.config import RunConfig
from engine.data import DataError, DataSpec, make_synthetic, prepare
from engine.train.device import resolve_device
from engine.data.contexts import ContextEncoder
from engine.train.stack import stack_data


def test_resolve_layers_file_then_flags_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"condition_key": "drug", "control": "ctrl", "preprocess": "arcsinh5"},
        "solver": {"name": "cellot", "inner_steps": 5},
        "train": {"steps": 300, "eval_every": 50},
    }))
    config = RunConfig.resolve(path, ["train.eval_every=25", "solver.init=uniform"], dataset="x.h5ad",
                               control="DMSO", steps=400, seed=3, workers=2, select_on="test")
    assert (config.data.condition_key, config.data.control, config.data.preprocess) == ("drug", "DMSO", "arcsinh5")
    assert (config.train.steps, config.train.eval_every, config.train.seed, config.data.seed) == (400, 25, 3, 3)
    assert config.solver_config().inner_steps == 5 and config.solver_config().init == "uniform"
    assert config.cluster.workers == 2 and config.data.select_on == "test"
    again = RunConfig.from_dict(config.to_dict())  # the saved config.yaml reproduces the run
    assert again.to_dict() == config.to_dict() and again.solver_config() == config.solver_config()


def test_resolve_defaults_published_and_typed_values():
    base = {"dataset": "x.h5ad", "condition_key": "c", "control": "ctrl"}
    default = RunConfig.resolve(**base)
    assert default.train.steps == 2000 and default.solver_config().dual == "amortized"
    published = RunConfig.resolve(**base, published=True)
    assert published.train.steps == 100_000
    c = published.solver_config()
    assert (c.dual, c.init, c.lr, c.lr_schedule, c.inner_steps) == ("minmax", "uniform", 1e-4, "constant", 10)
    # explicit flags and --set win over the published settings
    mixed = RunConfig.resolve(overrides=["solver.init=gaussian"], **base, published=True, steps=7)
    assert mixed.train.steps == 7 and mixed.solver_config().init == "gaussian"
    assert mixed.solver_config().dual == "minmax"
    with pytest.raises(DataError, match="no published configuration"):
        RunConfig.resolve(**base, solver="identity", published=True)
    typed = RunConfig.resolve(overrides=["solver.betas=[0.1, 0.2]", "train.steps='12'"], **base)
    assert typed.solver_config().betas == (0.1, 0.2) and typed.train.steps == 12
    with pytest.raises(DataError, match="inner_steps"):
        RunConfig.resolve(overrides=["solver.inner_steps=1.5"], **base)
    with pytest.raises(DataError, match="unknown train option"):
        RunConfig.resolve(overrides=["train.stepz=3"], **base)
    with pytest.raises(DataError, match="steps"):
        RunConfig.resolve(overrides=["train.steps=-1"], **base)


@pytest.mark.parametrize(
    "device, gpus, workers, cluster_gpus, placed",
    [
        ("cpu", 0.0, 2, 4.0, (2, 0.0)),
        ("auto", 0.0, 2, 0.0, (2, 0.0)),  # no GPU: CPU workers
        ("auto", 0.0, 2, 1.0, (2, 0.5)),  # fewer GPUs than workers: an equal share each
        ("auto", 0.0, 2, 2.0, (2, 1.0)),  # a GPU per worker
        ("cuda", 0.0, 2, 2.0, (2, 1.0)),
        ("cuda", 0.25, 8, 2.0, (4, 0.25)),  # capped at the 4 maps
        ("cuda", 0.0, 2, 1.0, "needs 2 worker(s) x 1 GPU(s)"),
        ("cuda", 0.0, 1, 0.0, "has 0 GPU(s)"),
    ],
)
def test_connect_for_places_workers_or_fails_with_exit_2(monkeypatch, device, gpus, workers, cluster_gpus, placed):
    """The placement rule of engine.cluster.runtime.connect_for, with Ray's answers stubbed."""
    from engine.cluster import runtime

    monkeypatch.setattr(runtime, "connect", lambda address: None)
    monkeypatch.setattr(runtime.ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": cluster_gpus})
    config = RunConfig.resolve(dataset="x", condition_key="c", control="k", device=device,
                               gpus_per_worker=gpus, workers=workers)
    if isinstance(placed, str):
        with pytest.raises(DataError, match=placed.replace("(", r"\(").replace(")", r"\)")):
            runtime.connect_for(config, n_maps=4)
    else:
        cluster = runtime.connect_for(config, n_maps=4)
        assert (cluster.workers, cluster.gpus_per_worker) == placed
        assert config.cluster.gpus_per_worker == gpus  # the saved config keeps what the user asked for


def test_device_strings_and_contradictions():
    from engine.train.device import parse_device

    assert parse_device("cuda:3") == ("cuda", 3) and parse_device("auto") == ("auto", None)
    for bad in ("tpu", "cpu:1", "cuda:x", "gpu"):
        with pytest.raises(DataError, match="unknown device"):
            parse_device(bad)
    with pytest.raises(DataError, match="contradicts"):
        RunConfig.resolve(dataset="x", condition_key="c", control="k", device="cpu", gpus_per_worker=1)
    with pytest.raises(DataError, match="unknown solver"):
        RunConfig.resolve(dataset="x", condition_key="c", control="k", overrides=["solver.name=cellott"])
    with pytest.raises(DataError, match="solver section"):
        RunConfig.resolve(dataset="x", condition_key="c", control="k", overrides=["solver=cellot"])
    with pytest.raises(DataError, match="init"):
        RunConfig.resolve(dataset="x", condition_key="c", control="k", overrides=["solver.init=gausian"])


def test_resolve_device_without_ray():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DataError, match="not available"):
        resolve_device(f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}")


def _cell_set(cells: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in np.asarray(cells, np.float32)}


@pytest.mark.parametrize("select_on", ["valid", "test"])
def test_selection_cells_come_from_the_select_on_split_only(select_on):
    adata = make_synthetic(n_perturbations=2, n_groups=2, dim=4, n_cells=200, seed=2)
    prepared = prepare(adata, DataSpec("condition", "control", split_by="group", select_on=select_on))
    keys = prepared.maps[:3]
    config = RunConfig.resolve(dataset="x", condition_key="condition", control="control", select_on=select_on,
                               train_params={"eval_cells": 1000})
    data = stack_data(prepared, keys, config, torch.device("cpu"))
    for k, key in enumerate(keys):
        chosen = _cell_set(data.valid_target.cells[k][data.valid_target.weights[k] > 0].numpy())
        assert chosen == _cell_set(prepared.cells(key.group, key.perturbation, select_on))
        if select_on == "valid":
            assert not chosen & _cell_set(prepared.cells(key.group, key.perturbation, "test"))
        assert not chosen & _cell_set(prepared.cells(key.group, key.perturbation, "train"))
    assert data.contexts is not None and data.contexts.shape == (3, 2 + 2)


def test_map_contexts_are_multi_hot_and_independent_of_the_stack():
    from engine.data import MapKey

    maps = [MapKey("a", "x"), MapKey("a", "x+y"), MapKey("b", "y")]
    spec = DataSpec("condition", "control", split_by="group")
    encoder = ContextEncoder.for_maps(spec, maps)
    full = encoder.encode_maps(spec, maps)
    np.testing.assert_array_equal(full, [[1, 0, 1, 0], [1, 1, 1, 0], [0, 1, 0, 1]])
    np.testing.assert_array_equal(encoder.encode_maps(spec, maps[2:]), full[2:])
