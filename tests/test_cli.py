"""The CLI: every malformed input is one clear line and exit code 2; the demo and metrics work."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from engine.cli import main
from engine.data import make_synthetic


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "cells.h5ad"
    make_synthetic(n_perturbations=2, n_groups=2, dim=5, n_cells=120, seed=3).write_h5ad(path)
    return path


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _bad(tmp_path, adata_change):
    adata = make_synthetic(n_perturbations=2, n_groups=2, dim=5, n_cells=120, seed=3)
    adata = adata_change(adata) or adata
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    return path


def _nan(a):
    a.X[3, 2] = np.nan


def _dup(a):
    a.var_names = ["f0", "f0"] + list(a.var_names[2:])


def _tiny(a):
    keep = ~((a.obs["condition"] == "pert1") & (a.obs["group"] == "g1"))
    keep[np.where(~keep)[0][:5]] = True
    return a[keep].copy()


@pytest.mark.parametrize(
    "case, make, args, needle",
    [
        ("unreadable file", lambda tmp, h: tmp / "missing.h5ad", [], "missing.h5ad"),
        ("not an h5ad", lambda tmp, h: (tmp / "x.h5ad").write_text("nope") and tmp / "x.h5ad", [], "x.h5ad"),
        ("missing condition key", lambda tmp, h: h, ["--condition-key", "drug"], "drug"),
        ("control absent", lambda tmp, h: h, ["--control", "ctrl"], "ctrl"),
        ("unknown perturbation", lambda tmp, h: h, ["--perturbations", "pert0,aspirin"], "aspirin"),
        ("missing split key", lambda tmp, h: h, ["--split-by", "donor"], "donor"),
        ("NaN values", lambda tmp, h: _bad(tmp, _nan), [], "finite"),
        ("duplicate features", lambda tmp, h: _bad(tmp, _dup), [], "f0"),
        ("group too small", lambda tmp, h: _bad(tmp, _tiny), ["--split-by", "group"], "g1"),
        ("bad --set", lambda tmp, h: h, ["--set", "train.nonsense=3"], "nonsense"),
        ("bad solver option", lambda tmp, h: h, ["--set", "solver.lr_typo=3"], "lr_typo"),
        ("mistyped option value", lambda tmp, h: h, ["--set", "solver.inner_steps=ten"], "inner_steps"),
        ("unknown device", lambda tmp, h: h, ["--device", "gpu"], "gpu"),
        ("absent GPU", lambda tmp, h: h, ["--device", "cuda"] if not _has_cuda() else ["--device", "cuda:99"], "cuda"),
        ("cpu with GPUs", lambda tmp, h: h, ["--device", "cpu", "--gpus-per-worker", "1"], "cpu"),
        ("bad select-on value", lambda tmp, h: h, ["--set", "data.select_on=train"], "select_on"),
        ("zero steps", lambda tmp, h: h, ["--steps", "0"], "steps must be >= 1"),
        ("negative steps", lambda tmp, h: h, ["--steps", "-5"], "steps"),
        ("zero workers", lambda tmp, h: h, ["--workers", "0"], "workers must be >= 1"),
        ("negative workers", lambda tmp, h: h, ["--workers", "-1"], "workers must be >= 1"),
        ("more workers than a fixed Ray has CPUs", lambda tmp, h: h, ["--workers", "64", "--split-by", "group"],
         "has 2 CPU(s)"),
        ("storage of an unknown scheme", lambda tmp, h: h, ["--storage", "nosuch://bucket/runs"], "nosuch://"),
        ("a held-out value not in the data", lambda tmp, h: h, ["--holdout", "group=g0,g7"], "'g7' not found"),
        ("an empty held-out value", lambda tmp, h: h, ["--holdout", "group=g0,"], "no empty value"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, make, args, needle, h5ad, tmp_path, capsys, ray_session):
    path = make(tmp_path, h5ad)
    base = {"--data": str(path), "--condition-key": "condition", "--control": "control"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["train", "--out", str(tmp_path / "run")] + [x for kv in base.items() for x in kv]
    capsys.readouterr()  # drop what writing the input printed (anndata warnings)
    assert main(argv) == 2, case
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("perturbot: error:"), err
    assert needle.lower() in err.lower(), err
    assert not (tmp_path / "run").exists(), "a refused run leaves no run directory"


def test_an_interrupt_is_one_line_after_the_progress_bar(monkeypatch, h5ad, tmp_path, capsys):
    """Ctrl-C: the bar ends, then one line saying how far it got and how to finish (no traceback)."""
    import engine.api
    from engine.progress import RunProgress

    def interrupted(config, run_dir, store, on_progress, resume, storage):
        on_progress(RunProgress(1, 4, 120, 800))
        raise KeyboardInterrupt

    monkeypatch.setattr(engine.api, "run", interrupted)
    out = tmp_path / "run"
    argv = ["train", "--data", str(h5ad), "--condition-key", "condition", "--control", "control", "--out", str(out)]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("training cellot: maps 1/4 | 120/800 map-steps")
    assert err[1] == f"perturbot: interrupted (1/4 maps done; finish with `perturbot train --resume {out}`)"


def test_train_without_data_or_config_says_what_is_missing(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--data" in err and "--condition-key" in err, err


def test_demo_metrics_and_predict(demo_run, tmp_path, capsys):
    from engine.api import FitResult

    out = demo_run
    assert len(FitResult.load(out).maps()) == 8
    assert main(["metrics", "--run", str(out), "--format", "csv"]) == 0
    csv = capsys.readouterr().out.splitlines()
    assert csv[0] == "perturbation,metric,model,identity,observed,mean_shift,gaussian" and len(csv) > 8

    trained = FitResult.load(out).metrics().set_index(["perturbation", "split", "metric", "step"])["value"]
    assert main(["evaluate", "--run", str(out), "--bootstrap", "2"]) == 0
    evaluated = FitResult.load(out).metrics().set_index(["perturbation", "split", "metric", "step"])["value"]
    boot = evaluated[evaluated.index.get_level_values("metric") == "mmd_boot_mean"]
    assert set(boot.index.get_level_values("split")) == {"test", "test_identity", "test_observed", "test_mean_shift", "test_gaussian"}
    assert boot.notna().all()
    # evaluate rewrites the training run's final rows with the same values (seeded per map)
    final = trained[trained.index.get_level_values("split").str.startswith("test")]
    assert len(final) > 0
    np.testing.assert_allclose(evaluated.loc[final.index].to_numpy(), final.to_numpy(), rtol=1e-5, atol=1e-7)
    capsys.readouterr()
    assert main(["runs", "--root", str(out.parent)]) == 0
    listed = capsys.readouterr().out
    assert "finished" in listed and "8/8 done (8 trained)" in listed  # per-run map statuses from the store
    full = ad.read_h5ad(out / "synthetic.h5ad")
    controls = full[full.obs["condition"] == "control"]
    g0 = controls[controls.obs["group"] == "g0"][:10]

    def predict(cells, *args: str):
        cells.write_h5ad(tmp_path / "in.h5ad")
        code = main(["predict", "--run", str(out), "--data", str(tmp_path / "in.h5ad"), "--out",
                     str(tmp_path / "p.h5ad"), *args])
        printed = capsys.readouterr()
        return code, (ad.read_h5ad(tmp_path / "p.h5ad") if code == 0 else None), printed.out + printed.err

    code, predicted, printed = predict(g0)  # each cell through its own group's 4 maps
    assert code == 0 and predicted.n_obs == 40 and set(predicted.obs["group"]) == {"g0"}
    assert "40 predicted cells: 10 of 10 input cells through 4 maps (4 perturbations in 1 groups)" in printed
    assert (predicted.obs["source_group"] == "g0").all() and (predicted.obs["condition"] == "control").all()
    assert predicted.uns["perturbot"]["run_id"] == FitResult.load(out).run_id and "note" not in printed
    code, predicted, _ = predict(g0, "--perturbations", "g0/pert1")
    assert predicted.n_obs == 10 and list(predicted.obs["source_cell"]) == list(g0.obs_names)
    code, predicted, _ = predict(g0, "--groups", "g1")  # a new population through another group's maps
    assert predicted.n_obs == 40 and set(predicted.obs["group"]) == {"g1"}
    code, predicted, printed = predict(g0, "--perturbations", "g1/pert0")
    assert code == 2 and "10 of 10 input cells belong to groups without a requested map" in printed
    treated = full[full.obs["condition"] != "control"][:5]
    code, predicted, printed = predict(ad.concat([g0, treated[treated.obs["group"] == "g0"]]))
    assert code == 0 and "are not controls" in printed
    anonymous = g0.copy()
    del anonymous.obs["group"]
    code, predicted, printed = predict(anonymous)
    assert predicted.n_obs == 80 and "obs has no 'group' column" in printed
    assert predict(g0, "--perturbations", "nope")[0] == 2
    assert predict(g0, "--groups", "g7")[0] == 2


@pytest.mark.slow  # a Ray fit of its own (~30 s); the split itself is tested in test_data
def test_select_on_test_keeps_cellots_protocol_and_says_so(ray_session, h5ad, tmp_path, capsys):
    """--select-on test: no valid split, the selection rows are named valid_test, the config records it."""
    from engine.api import FitResult
    from engine.data import PreparedData

    out = tmp_path / "cellot-protocol"
    argv = ["train", "--data", str(h5ad), "--condition-key", "condition", "--control", "control",
            "--split-by", "group", "--select-on", "test", "--steps", "10", "--set", "train.eval_every=5",
            "--out", str(out)]
    assert main(argv) == 0
    result = FitResult.load(out)
    splits = set(result.metrics()["split"])
    assert "valid_test" in splits and "valid" not in splits
    assert result.config.data.select_on == "test"
    assert {split for _, _, split in PreparedData.load(result.dir.data).tables} == {"train", "test"}
