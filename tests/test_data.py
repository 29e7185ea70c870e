"""engine.data: validation, reading, splits, preprocessing, PCA, markers, Arrow tables, synthetic data."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from scipy import sparse, stats

from engine.data import (
    DataError,
    DataSpec,
    MapKey,
    PreparedData,
    make_synthetic,
    prepare,
    read_h5ad,
    synthetic_map,
)
from engine.data.embed import fit_pca
from engine.data.markers import welch_t
from engine.data.prepared import read_tables
from engine.data.preprocess import highly_variable

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BCRXL = DATA / "catalyst_bodenmiller_bcrxl" / "bcrxl_16samples.h5ad"
KANG = DATA / "scgen_kang_valid_2018" / "valid.h5ad"


def spec(**kw) -> DataSpec:
    return DataSpec(**{"condition_key": "condition", "control": "control", "min_cells": 10, **kw})


def small(**kw) -> ad.AnnData:
    """2 groups x (control, pert0, pert1) x 60 cells, 6 features (with negative values)."""
    return make_synthetic(**{"n_perturbations": 2, "n_groups": 2, "dim": 6, "n_cells": 60, "seed": 1, **kw})


def counts(n: int = 80, d: int = 12, seed: int = 0) -> ad.AnnData:
    """Poisson counts, conditions control / drug; the drug raises features 2 and 7; feature 0 is 0 in controls."""
    rng = np.random.default_rng(seed)
    rate = np.full((2 * n, d), 3.0)
    rate[n:, [2, 7]] = 12.0
    x = rng.poisson(rate).astype(np.float32)
    x[:n, 0] = 0.0
    obs = pd.DataFrame(
        {"condition": ["control"] * n + ["drug"] * n, "donor": rng.choice(["d0", "d1", "d2"], 2 * n)},
        index=[f"c{i}" for i in range(2 * n)],
    )
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(d)]))


def rows_of(adata: ad.AnnData, names: list[str]) -> np.ndarray:
    return np.asarray(adata[names].X)


# ---------------------------------------------------------------- spec, names, errors


def test_map_key_name_and_spec_round_trip() -> None:
    assert MapKey("g0", "drug").name == "g0/drug"
    assert MapKey(None, "drug").name == "drug"
    s = spec(perturbations=["a", "b"], holdout=["donor", "d1"], embed="pca:5", preprocess="arcsinh5",
             split_by="donor", groups=["d0", "d2"])
    assert s.perturbations == ("a", "b") and s.holdout == ("donor", ("d1",)) and s.groups == ("d0", "d2")
    assert DataSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    several = spec(holdout=["donor", ["d1", "d2"]])  # --holdout donor=d1,d2; a config's [KEY, VALUE] is one value
    assert several.holdout == ("donor", ("d1", "d2")) and DataSpec.from_dict(several.to_dict()) == several
    assert several.holdout_text == "donor='d1','d2'"
    with pytest.raises(DataError, match="distinct"):
        spec(holdout=["donor", ["d1", "d1"]])
    assert (s.select_on, s.valid_fraction, s.splits) == ("valid", 0.1, ("train", "valid", "test"))
    cellot = spec(select_on="test", valid_fraction=0.3, test_fraction=0.25)
    assert cellot.splits == ("train", "test") and DataSpec.from_dict(cellot.to_dict()) == cellot
    assert DataError("first\nsecond").args[0] == "first second"


def _drop_pair(adata: ad.AnnData, group: str, condition: str, keep: int) -> ad.AnnData:
    pair = np.flatnonzero((adata.obs["group"] == group) & (adata.obs["condition"] == condition))
    return adata[np.setdiff1d(np.arange(adata.n_obs), pair[keep:])].copy()


def _with_x(adata: ad.AnnData, edit) -> ad.AnnData:
    adata = adata.copy()
    edit(adata.X)
    return adata


def _with_var_names(adata: ad.AnnData, names: list[str]) -> ad.AnnData:
    adata = adata.copy()
    adata.var_names = names
    return adata


def _with_obs_names(adata: ad.AnnData, names: list[str]) -> ad.AnnData:
    adata = adata.copy()
    adata.obs_names = names
    return adata


def _nan_inf(x: np.ndarray) -> None:
    x[3, 2], x[5, 1] = np.nan, np.inf


def _one_control_outside_batch_b1(adata: ad.AnnData) -> ad.AnnData:
    """obs["batch"]: "b1" for every cell but the first control cell."""
    adata = adata.copy()
    first_control = np.flatnonzero(adata.obs["condition"] == "control")[0]
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) == first_control, "b0", "b1")
    return adata


ERROR_CASES = {
    "condition key": (lambda a: a, dict(condition_key="treatment"), ["'treatment'", "obs column"]),
    "split_by key": (lambda a: a, dict(split_by="donor"), ["split_by", "'donor'"]),
    "holdout key": (lambda a: a, dict(holdout=("donor", "d1")), ["holdout", "'donor'"]),
    "holdout value": (lambda a: a, dict(holdout=("group", "g9")), ["'g9'", "'group'"]),
    "control": (lambda a: a, dict(control="ctrl"), ["'ctrl'", "'condition'"]),
    "unknown perturbations": (lambda a: a, dict(perturbations=("pert0", "drugX", "drugY")), ["'drugX'", "'drugY'"]),
    "control as perturbation": (lambda a: a, dict(perturbations=("pert0", "control")), ["'control'"]),
    "unknown groups": (lambda a: a, dict(split_by="group", groups=("g0", "g7")), ["'g7'", "obs['group']", "'g1'"]),
    "groups without split_by": (lambda a: a, dict(groups=("g0",)), ["--split-by"]),
    "no map in the groups": (lambda a: _drop_pair(a, "g1", "pert1", keep=0),
                             dict(split_by="group", groups=("g1",), perturbations=("pert1",)), ["no map", "'g1'"]),
    "non-finite": (lambda a: _with_x(a, _nan_inf), {}, ["2 non-finite"]),
    "duplicate features": (lambda a: _with_var_names(a, ["f0", "f1", "f1", "f3", "f3", "f5"]), {}, ["'f1'", "'f3'"]),
    "duplicate cells": (lambda a: _with_obs_names(a, ["same"] * 2 + list(a.obs_names[2:])), {}, ["'same'"]),
    "too few cells": (
        lambda a: _drop_pair(a, "g1", "pert1", keep=7),
        dict(split_by="group"),
        ["'pert1'", "'g1'", "7 cells", "min_cells=10"],
    ),
    "too few controls": (lambda a: a, dict(split_by="group", min_cells=61), ["'control'", "'g0'", "60 cells"]),
    "obsm key": (lambda a: a, dict(obsm_key="X_pca"), ["'X_pca'"]),
    "preprocess": (lambda a: a, dict(preprocess="zscore"), ["'zscore'"]),
    "embed pca:x": (lambda a: a, dict(embed="pca:x"), ["'pca:x'"]),
    "embed umap": (lambda a: a, dict(embed="umap:5"), ["'umap:5'"]),
    "embed pca:0": (lambda a: a, dict(embed="pca:0"), ["'pca:0'"]),
    "embed too wide": (lambda a: a, dict(embed="pca:7"), ["'pca:7'", "6 features"]),
    "negative log1p_normalize": (lambda a: a, dict(preprocess="log1p_normalize"), ["'log1p_normalize'", "negative"]),
    "negative qscale": (lambda a: a, dict(preprocess="qscale_log1p"), ["'qscale_log1p'", "negative"]),
    "holdout empties a split": (
        lambda a: a,
        dict(split_by="group", holdout=("group", "g0")),
        ["empty split", "'g0'", "0 train"],
    ),
    "holdout empties the valid split": (
        _one_control_outside_batch_b1,
        dict(holdout=("batch", "b1")),
        ["empty split", "'control'", "1 train, 0 valid and 119 test", "batch='b1'"],
    ),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_prepare_errors_are_one_line_and_name_the_problem(case: str) -> None:
    edit, kwargs, expected = ERROR_CASES[case]
    adata = edit(small())
    with pytest.raises(DataError) as info:
        prepare(adata, spec(**kwargs))
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (case, message)


def test_other_errors(tmp_path: Path) -> None:
    def check(call, *parts: str) -> None:
        with pytest.raises(DataError) as info:
            call()
        assert "\n" not in str(info.value) and all(p in str(info.value) for p in parts), str(info.value)

    check(lambda: read_h5ad(tmp_path / "missing.h5ad"), "missing.h5ad", "not found")
    (tmp_path / "junk.h5ad").write_bytes(b"not an hdf5 file\n" * 10)
    check(lambda: read_h5ad(tmp_path / "junk.h5ad"), "junk.h5ad", "cannot read")
    check(lambda: DataSpec.from_dict({"condition_key": "c", "control": "x", "split": "a"}), "'split'")
    check(lambda: DataSpec.from_dict({"condition_key": "c"}), "'control'")
    check(lambda: spec(select_on="train"), "select_on", "'train'")
    check(lambda: spec(valid_fraction=0.0), "valid_fraction", "0.0")
    check(lambda: spec(valid_fraction=1.0), "valid_fraction", "1.0")
    check(lambda: spec(test_fraction=0.5, valid_fraction=0.5), "test_fraction + valid_fraction", "< 1")
    check(lambda: spec(test_fraction=1.0, select_on="test"), "test_fraction")
    check(lambda: PreparedData.load(tmp_path), str(tmp_path))
    adata = small()
    prepared = prepare(adata, spec())
    renamed = _with_var_names(adata, ["f0", "f1", "f2", "f3", "f4", "zz"])
    check(lambda: prepared.encode_controls(renamed), "'f5'", "'zz'")


def test_read_h5ad_reads_a_written_file(tmp_path: Path) -> None:
    adata = small(growth=True)
    adata.write_h5ad(tmp_path / "s.h5ad")
    back = read_h5ad(tmp_path / "s.h5ad")
    np.testing.assert_array_equal(back.X, adata.X)
    assert list(back.obs_names) == list(adata.obs_names)


# ---------------------------------------------------------------- reading dense, sparse, obsm


def test_dense_sparse_and_obsm_give_the_same_tables() -> None:
    dense = counts()
    as_sparse = dense.copy()
    as_sparse.X = sparse.csr_matrix(dense.X)
    in_obsm = ad.AnnData(X=np.zeros((dense.n_obs, 1), np.float32), obs=dense.obs.copy())
    in_obsm.obsm["feat"] = pd.DataFrame(dense.X, index=dense.obs_names, columns=dense.var_names)
    s = spec(preprocess="log1p_normalize")
    reference = prepare(dense, s)
    for other, obsm_key in ((as_sparse, None), (in_obsm, "feat")):
        prepared = prepare(other, DataSpec.from_dict({**s.to_dict(), "obsm_key": obsm_key}))
        assert prepared.features == reference.features
        for group, condition, split in reference.tables:
            np.testing.assert_array_equal(
                prepared.cells(group, condition, split), reference.cells(group, condition, split)
            )
    in_obsm.obsm["arr"] = dense.X.copy()
    assert prepare(in_obsm, spec(obsm_key="arr")).features[:2] == ["arr_0", "arr_1"]


# ---------------------------------------------------------------- splits


def _split_names(prepared: PreparedData) -> dict:
    return {key: prepared.cell_names(*key) for key in prepared.tables}


def _pair_names(adata: ad.AnnData, group: str, condition: str) -> set[str]:
    return set(adata.obs_names[(adata.obs["group"] == group) & (adata.obs["condition"] == condition)])


def _former_test_cells(adata: ad.AnnData, group_key: str | None, seed: int, fraction: float = 0.2) -> set[str]:
    """The test cells of the former train/test split (split_test_cells), re-implemented here."""
    groups = adata.obs[group_key].astype(str) if group_key else pd.Series("", index=adata.obs_names)
    frame = pd.DataFrame({"group": groups.to_numpy(), "condition": adata.obs["condition"].astype(str).to_numpy()})
    chosen = []
    for (group, condition), idx in frame.groupby(["group", "condition"], sort=True).indices.items():
        n = len(idx)
        n_test = min(max(int(np.floor(fraction * n + 0.5)), 1), n - 1) if n >= 2 else 0
        rng = np.random.default_rng([seed, zlib.crc32(f"{group}\0{condition}".encode())])
        chosen.extend(rng.choice(np.asarray(idx), size=n_test, replace=False))
    return set(adata.obs_names[np.asarray(chosen, dtype=int)])


def _split_cells(prepared: PreparedData, split: str) -> set[str]:
    return {name for g, c, s in prepared.tables if s == split for name in prepared.cell_names(g, c, s)}


def test_splits_are_seeded_disjoint_and_70_10_20_per_group_and_condition() -> None:
    adata = small()
    first = prepare(adata, spec(split_by="group", seed=3))
    assert {s for _, _, s in first.tables} == {"train", "valid", "test"}
    assert _split_names(prepare(adata, spec(split_by="group", seed=3))) == _split_names(first)
    other = _split_names(prepare(adata, spec(split_by="group", seed=4)))
    assert all(other[key] != names for key, names in _split_names(first).items())
    for group in ("g0", "g1"):
        for condition in ("control", "pert0", "pert1"):
            train, valid, test = (set(first.cell_names(group, condition, s)) for s in ("train", "valid", "test"))
            assert not train & valid and not train & test and not valid & test
            assert train | valid | test == _pair_names(adata, group, condition)
            assert (len(train), len(valid), len(test)) == (42, 6, 12)
    # a pair's split does not depend on which other pairs are prepared
    only_pert0 = prepare(adata, spec(split_by="group", seed=3, perturbations=("pert0",)))
    for split in ("train", "valid", "test"):
        assert only_pert0.cell_names("g1", "control", split) == first.cell_names("g1", "control", split)
    assert [k.name for k in only_pert0.maps] == ["g0/pert0", "g1/pert0"]
    # nor on which groups are prepared (--only-groups): only the cells of those groups are kept
    only_g1 = prepare(adata, spec(split_by="group", seed=3, groups=("g1",)))
    assert [k.name for k in only_g1.maps] == ["g1/pert0", "g1/pert1"]
    assert {g for g, _, _ in only_g1.tables} == {"g1"}
    assert _split_names(only_g1) == {key: names for key, names in _split_names(first).items() if key[0] == "g1"}
    # 80 cells per condition: 56 / 8 / 16
    prepared = prepare(counts(), spec(seed=1))
    for condition in ("control", "drug"):
        assert [len(prepared.cell_names(None, condition, s)) for s in ("train", "valid", "test")] == [56, 8, 16]


@pytest.mark.parametrize("seed", [0, 3])
def test_test_cells_are_those_of_the_former_80_20_split(seed: int) -> None:
    adata = small(n_cells=57)
    former = _former_test_cells(adata, "group", seed)
    three = prepare(adata, spec(split_by="group", seed=seed))
    cellot = prepare(adata, spec(split_by="group", seed=seed, select_on="test"))
    assert _split_cells(three, "test") == former == _split_cells(cellot, "test")
    assert {s for _, _, s in cellot.tables} == {"train", "test"}
    assert _split_cells(cellot, "train") == set(adata.obs_names) - former
    assert _split_cells(three, "train") | _split_cells(three, "valid") == _split_cells(cellot, "train")
    assert _former_test_cells(adata, None, seed) == _split_cells(prepare(adata, spec(seed=seed)), "test")


def test_holdout_puts_exactly_the_holdout_cells_in_test() -> None:
    adata = counts()
    prepared = prepare(adata, spec(holdout=("donor", "d1")))
    for condition in ("control", "drug"):
        in_condition = adata.obs["condition"] == condition
        held = set(adata.obs_names[in_condition & (adata.obs["donor"] == "d1")])
        rest = set(adata.obs_names[in_condition]) - held
        train, valid = set(prepared.cell_names(None, condition, "train")), set(prepared.cell_names(None, condition, "valid"))
        assert set(prepared.cell_names(None, condition, "test")) == held
        assert not train & valid and train | valid == rest
        assert len(valid) == int(np.floor(0.1 * len(rest) + 0.5))
    cellot = prepare(adata, spec(holdout=("donor", "d1"), select_on="test"))
    assert {s for _, _, s in cellot.tables} == {"train", "test"}
    assert _split_cells(cellot, "test") == _split_cells(prepared, "test")


# ---------------------------------------------------------------- preprocessing


def _data_space(prepared: PreparedData, adata: ad.AnnData, condition: str, split: str):
    names = prepared.cell_names(None, condition, split)
    return prepared.cells(None, condition, split, space="data"), rows_of(adata, names)


@pytest.mark.parametrize("kind", ["none", "log1p_normalize", "qscale_log1p", "arcsinh5"])
def test_preprocessing_formulas(kind: str) -> None:
    adata = counts()
    prepared = prepare(adata, spec(preprocess=kind))
    control_train = rows_of(adata, prepared.cell_names(None, "control", "train"))
    q = np.percentile(control_train, 75, axis=0)
    assert q[0] == 0 and q[2] > 0
    formulas = {
        "none": lambda x: x,
        "log1p_normalize": lambda x: np.log1p(1e4 * x / x.sum(axis=1, keepdims=True)),
        "qscale_log1p": lambda x: np.log1p(x / np.where(q > 0, q, 1.0)),
        "arcsinh5": lambda x: np.arcsinh(x / 5.0),
    }
    for condition in ("control", "drug"):
        for split in ("train", "valid", "test"):
            got, raw = _data_space(prepared, adata, condition, split)
            np.testing.assert_allclose(got, formulas[kind](raw.astype(np.float64)), rtol=1e-5, atol=1e-6)


def _seurat_reference(x: np.ndarray, n: int) -> np.ndarray:
    """scanpy's flavor="seurat" recipe, written literally with pandas (cut into 20 bins, groupby)."""
    e = np.expm1(x.astype(np.float64))
    mean, var = e.mean(axis=0), e.var(axis=0, ddof=1)
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    frame = pd.DataFrame({"mean": np.log1p(mean), "dispersion": np.log(dispersion)})
    frame["bin"] = pd.cut(frame["mean"], bins=20)
    by_bin = frame.groupby("bin", observed=True)["dispersion"]
    bin_mean, bin_std = by_bin.mean(), by_bin.std(ddof=1)
    single = bin_std.isnull()
    bin_std[single], bin_mean[single] = bin_mean[single], 0.0
    score = (frame["dispersion"] - bin_mean[frame["bin"]].to_numpy()) / bin_std[frame["bin"]].to_numpy()
    return np.sort(np.argsort(-np.nan_to_num(score.to_numpy(), nan=-np.inf), kind="stable")[:n])


def test_highly_variable_is_the_seurat_recipe() -> None:
    rng = np.random.default_rng(0)
    means = np.exp(rng.uniform(np.log(0.5), np.log(10), 200))
    x = rng.poisson(means, size=(500, 200)).astype(np.float64)
    x[:, ::20] = rng.poisson(rng.gamma(0.1, means[::20] / 0.1, size=(500, 10)))  # overdispersed
    x[:, 7] = 0.0  # never expressed: never picked
    x = np.log1p(x).astype(np.float32)
    for n in (10, 30, 199):
        picked = highly_variable(x, n)
        np.testing.assert_array_equal(picked, _seurat_reference(x, n))
    assert 7 not in highly_variable(x, 199)
    assert len(set(highly_variable(x, 10)) & set(range(0, 200, 20))) >= 5
    with pytest.raises(DataError, match="201 highly variable features; the data have 200"):
        highly_variable(x, 201)
    with pytest.raises(DataError, match="non-negative"):
        highly_variable(x - 1.0, 10)


def test_hvg_selects_on_train_cells_and_new_cells_keep_all_inputs(tmp_path: Path) -> None:
    adata = counts(n=120, d=40)
    s = spec(preprocess="log1p_normalize", hvg=8)
    prepared = prepare(adata, s)
    full = prepare(adata, spec(preprocess="log1p_normalize"))
    train = np.concatenate([full.cells(None, c, "train", space="data") for c in ("control", "drug")])
    keep = highly_variable(train, 8)
    assert prepared.features == [f"g{j}" for j in keep] and prepared.input_features == full.features
    assert prepared.dim == 8
    for key in full.tables:
        np.testing.assert_array_equal(prepared.cells(*key), full.cells(*key)[:, keep])
    test = [n for c in ("control", "drug") for n in prepared.cell_names(None, c, "test")]
    changed = adata.copy()
    changed.X[changed.obs_names.get_indexer(test)] = 0.0  # test cells never influence the selection
    assert prepare(changed, s).features == prepared.features
    controls = adata[adata.obs["condition"] == "control"][:5]
    np.testing.assert_allclose(prepared.encode_controls(controls),
                               full.encode_controls(controls)[:, keep], rtol=1e-6)
    assert PreparedData.load(prepared.save(tmp_path / "p")) == prepared
    with pytest.raises(DataError, match="hvg must be >= 1"):
        spec(hvg=0)


def test_arcsinh_accepts_negative_values() -> None:
    adata = small()
    prepared = prepare(adata, spec(preprocess="arcsinh5"))
    got = prepared.cells(None, "pert1", "test")
    raw = rows_of(adata, prepared.cell_names(None, "pert1", "test"))
    assert raw.min() < 0
    np.testing.assert_allclose(got, np.arcsinh(raw / 5.0), rtol=1e-6)


# ---------------------------------------------------------------- embedding


def _train_data(prepared: PreparedData) -> np.ndarray:
    return np.concatenate([prepared.cells(g, c, "train", "data") for g, c, s in prepared.tables if s == "train"])


def test_pca_is_fitted_on_train_cells_and_round_trips() -> None:
    adata = small()
    prepared = prepare(adata, spec(split_by="group", embed="pca:4"))
    embedding = prepared.embedding
    assert prepared.dim == 4 and embedding.components.shape == (4, 6)
    x_train = _train_data(prepared).astype(np.float64)
    np.testing.assert_allclose(embedding.mean, x_train.mean(axis=0), atol=1e-5)
    assert np.abs(embedding.mean - adata.X.mean(axis=0)).max() > 1e-3  # all cells would give another mean
    _, _, vt = np.linalg.svd(x_train - x_train.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(np.abs(embedding.components @ vt[:4].T), np.eye(4), atol=1e-4)
    z = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    np.testing.assert_allclose(embedding.encode(embedding.decode(z)), z, atol=1e-4)
    x_test = prepared.cells("g1", "pert0", "test", "data")
    np.testing.assert_allclose(prepared.cells("g1", "pert0", "test"), embedding.encode(x_test), atol=1e-5)


def test_decoded_cells_stay_above_the_floor_of_non_negative_data(tmp_path: Path) -> None:
    prepared = prepare(counts(), spec(preprocess="log1p_normalize", embed="pca:3"))
    assert prepared.embedding.floor == 0.0
    decoded = prepared.embedding.decode(prepared.cells(None, "drug", "test") * 3.0)
    assert decoded.min() == 0.0  # clamped: the unclamped decode goes below 0
    assert PreparedData.load(prepared.save(tmp_path / "p")) == prepared
    assert prepare(small(), spec(embed="pca:3")).embedding.floor is None  # data with negative values


def test_autoencoder_latent_is_fitted_on_train_cells_cached_and_saved(tmp_path: Path, monkeypatch, one_thread) -> None:
    """"ae:K": an autoencoder (hidden 512, 512) trained on the train cells; 300 steps here (3000 by default)."""
    import engine.data.embed as embed

    monkeypatch.setattr(embed, "AE_STEPS", 300)
    monkeypatch.setenv("PERTURBOT_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)  # non-negative cells on a 3-dim curved manifold in 12 dims
    adata = counts(n=150, d=12)
    adata.X = np.log1p(np.exp(rng.normal(size=(300, 3)) @ rng.normal(size=(3, 12)))).astype(np.float32)
    s = spec(embed="ae:4")
    prepared = prepare(adata, s)
    model = prepared.embedding
    assert isinstance(model, embed.AutoencoderEmbedding) and prepared.dim == 4 and model.floor == 0.0
    x_test = prepared.cells(None, "drug", "test", space="data")
    np.testing.assert_allclose(prepared.cells(None, "drug", "test"), model.encode(x_test), atol=1e-5)
    error = ((model.decode(model.encode(x_test)) - x_test) ** 2).mean()
    assert error < 0.1 * x_test.var(axis=0).mean()  # far better than the features' means
    assert model.decode(np.full((5, 4), -50.0, np.float32)).min() >= 0.0
    assert len(list((tmp_path / "cache" / "autoencoders").iterdir())) == 1
    def no_training(*args, **kwargs):
        raise AssertionError("the cached autoencoder was trained again")

    monkeypatch.setattr(embed.torch.optim, "Adam", no_training)  # a cache hit loads, it does not train
    assert prepare(adata, s).embedding == model
    assert PreparedData.load(prepared.save(tmp_path / "p")) == prepared
    with pytest.raises(DataError, match="'ae:12' asks for a 12-dim latent; the data have 12 features"):
        prepare(adata, spec(embed="ae:12"))


@pytest.mark.parametrize("shape", [(200, 10), (30, 100)])
def test_fit_pca_matches_svd_on_both_gram_branches(shape: tuple[int, int]) -> None:
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32) * np.linspace(3, 0.5, shape[1], dtype=np.float32)
    embedding = fit_pca(x, 5)
    _, _, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(np.abs(embedding.components @ vt[:5].T), np.eye(5), atol=1e-4)
    full = fit_pca(x, min(shape))
    np.testing.assert_allclose(full.decode(full.encode(x)), x, atol=1e-4)


# ---------------------------------------------------------------- markers


def test_markers_rank_by_welch_t() -> None:
    adata = counts()
    prepared = prepare(adata, spec(markers=5))
    assert sorted(prepared.markers["drug"][:2]) == [2, 7] and len(prepared.markers["drug"]) == 5
    assert len(prepare(adata, spec(markers=50)).markers["drug"]) == 12
    a, b = np.random.default_rng(0).normal(size=(40, 3)), np.random.default_rng(1).normal(1, 2, size=(25, 3))
    np.testing.assert_allclose(welch_t(a, b), stats.ttest_ind(a, b, equal_var=False).statistic)


# ---------------------------------------------------------------- tables, save/load, encode_controls


def test_tables_maps_and_zero_copy_reads() -> None:
    adata = small()
    prepared = prepare(adata, spec(split_by="group"))
    assert [k.name for k in prepared.maps] == ["g0/pert0", "g0/pert1", "g1/pert0", "g1/pert1"]
    assert len(prepared.tables) == 2 * 3 * 3  # groups x conditions x splits
    table = prepared.tables[("g0", "pert1", "train")]
    assert table.column_names == ["cell", "x"] and table.schema.field("x").type.list_size == 6
    first, second = prepared.cells("g0", "pert1", "train"), prepared.cells("g0", "pert1", "train")
    assert first.dtype == np.float32 and np.shares_memory(first, second) and not first.flags.writeable
    key = MapKey("g1", "pert0")
    assert prepared.control_of(key) == ("g1", "control") and prepared.n_cells(key) == 2 * 42
    np.testing.assert_array_equal(first, rows_of(adata, prepared.cell_names("g0", "pert1", "train")))
    assert prepare(adata, spec()).maps == [MapKey(None, "pert0"), MapKey(None, "pert1")]


@pytest.mark.parametrize("kwargs", [dict(split_by="group"), dict(embed="pca:3"), dict(select_on="test")])
def test_save_load_round_trip(tmp_path: Path, kwargs: dict) -> None:
    adata = counts() if "embed" in kwargs else small()
    kwargs = {**kwargs, "preprocess": "qscale_log1p"} if "embed" in kwargs else kwargs
    prepared = prepare(adata, spec(**kwargs))
    directory = prepared.save(tmp_path / "prepared")
    allocated = pa.total_allocated_bytes()
    loaded = PreparedData.load(directory)
    assert loaded == prepared and loaded.dim == prepared.dim
    assert {s for _, _, s in loaded.tables} == set(prepared.spec.splits)
    for key in prepared.tables:
        for space in ("train", "data"):
            np.testing.assert_array_equal(loaded.cells(*key, space=space), prepared.cells(*key, space=space))
    assert pa.total_allocated_bytes() == allocated  # memory-mapped: nothing read into Arrow's pool
    assert loaded != prepare(adata, spec(**{**kwargs, "seed": 9}))


def test_layout_and_some_tables_hold_only_the_cells_asked_for(tmp_path: Path) -> None:
    """A driver's layout holds no cells but knows every table's size; a worker reads only its tables."""
    prepared = prepare(small(), spec(split_by="group"))
    directory = prepared.save(tmp_path / "prepared")
    layout = PreparedData.load(directory, tables=())
    assert layout.tables == {} and layout.table_rows == prepared.table_rows and layout.maps == prepared.maps
    assert [layout.n_cells(k) for k in layout.maps] == [prepared.n_cells(k) for k in prepared.maps]
    assert layout == prepared.layout()
    wanted = [("g1", "control", "train"), ("g1", "pert0", "test")]
    assert sorted(read_tables(directory, wanted)) == wanted
    assert all(read_tables(directory, wanted)[key].equals(prepared.tables[key]) for key in wanted)
    with pytest.raises(KeyError, match="not held here"):
        layout.cells("g1", "control", "train")
    with pytest.raises(KeyError, match="no cell table"):
        read_tables(directory, [("g9", "control", "train")])


def test_load_reads_format_1_as_selected_on_test(tmp_path: Path) -> None:
    """Prepared data written before the valid split (format 1, train/test tables) load as select_on="test"."""
    prepared = prepare(small(), spec(select_on="test"))
    directory = prepared.save(tmp_path / "prepared")
    meta = json.loads((directory / "meta.json").read_text())
    del meta["spec"]["select_on"], meta["spec"]["valid_fraction"]
    (directory / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    assert PreparedData.load(directory) == prepared


@pytest.mark.parametrize(
    "kwargs",
    [dict(split_by="group", embed="pca:3", preprocess="arcsinh5"), dict(preprocess="qscale_log1p", embed="pca:4")],
)
def test_encode_controls_reproduces_training_features(kwargs: dict) -> None:
    adata = small() if "split_by" in kwargs else counts()
    prepared = prepare(adata, spec(**kwargs))
    for group in ("g0", "g1") if "split_by" in kwargs else (None,):
        for split in ("train", "valid", "test"):
            names = prepared.cell_names(group, "control", split)
            subset = adata[names[:10]]  # too few cells to re-fit the percentiles: the fitted ones must be used
            expected = prepared.cells(group, "control", split)[:10]
            np.testing.assert_allclose(prepared.encode_controls(subset), expected, atol=1e-5)
            reordered = subset[:, subset.var_names[::-1]]
            np.testing.assert_allclose(prepared.encode_controls(reordered), expected, atol=1e-5)


# ---------------------------------------------------------------- synthetic generator


def test_synthetic_shapes_and_determinism() -> None:
    adata = make_synthetic()
    assert adata.shape == (2 * 4 * 500, 8) and adata.X.dtype == np.float32
    assert list(adata.var_names[:2]) == ["f0", "f1"] and adata.obs_names.is_unique
    assert set(adata.obs["condition"]) == {"control", "pert0", "pert1", "pert2"}
    assert set(adata.obs["group"]) == {"g0", "g1"}
    json.dumps(adata.uns["synthetic"])
    np.testing.assert_array_equal(make_synthetic(seed=0).X, adata.X)
    assert not np.allclose(make_synthetic(seed=1).X, adata.X)
    assert make_synthetic(n_perturbations=1, n_groups=3, dim=4, n_cells=50).shape == (3 * 2 * 50, 4)


def _cluster_shares(adata: ad.AnnData, group: str, condition: str) -> np.ndarray:
    obs = adata.obs[(adata.obs["group"] == group) & (adata.obs["condition"] == condition)]
    return np.bincount(obs["cluster"], minlength=3) / len(obs)


def _synthetic_maps(adata):
    """(group, perturbation, ground truth) of every map of a make_synthetic AnnData."""
    return [(g, p, truth) for g, maps in adata.uns["synthetic"]["maps"].items() for p, truth in maps.items()]


def test_synthetic_growth_changes_proportions() -> None:
    for growth in (False, True):
        adata = make_synthetic(growth=growth, n_cells=600)
        for group, pert, truth in _synthetic_maps(adata):
            name = f"{group}/{pert}"
            change = np.abs(_cluster_shares(adata, group, pert) - _cluster_shares(adata, group, "control")).max()
            assert (change > 0.08) == growth, (name, change)
            np.testing.assert_allclose(_cluster_shares(adata, group, pert), truth["proportions"], atol=0.07)


def test_synthetic_ground_truth_map_explains_the_perturbed_cells() -> None:
    adata = make_synthetic(n_cells=600)
    obs = adata.obs
    for group, pert, _ in _synthetic_maps(adata):
        name = f"{group}/{pert}"
        for cluster in range(3):
            in_cluster = (obs["group"] == group) & (obs["cluster"] == cluster)
            pushed = synthetic_map(adata, name, adata.X[in_cluster & (obs["condition"] == "control")])
            observed = adata.X[in_cluster & (obs["condition"] == pert)]
            np.testing.assert_allclose(pushed.mean(axis=0), observed.mean(axis=0), atol=0.3)
        assert np.abs(synthetic_map(adata, name, adata.X[:5]) - adata.X[:5]).max() > 0.5


# ---------------------------------------------------------------- real data (../shared/data)


@pytest.mark.skipif(not BCRXL.is_file(), reason=f"real data not available: {BCRXL} (../shared/data beside the repo)")
def test_bcrxl_per_donor_maps() -> None:
    adata = read_h5ad(BCRXL)
    prepared = prepare(adata, DataSpec("condition", "Ref", split_by="patient_id"))
    assert [k.name for k in prepared.maps] == [f"Patient{i}/BCRXL" for i in range(1, 9)]
    assert prepared.dim == 24 and prepared.embedding is None and len(prepared.features) == 24
    assert sum(t.num_rows for t in prepared.tables.values()) == adata.n_obs
    x = prepared.cells("Patient3", "BCRXL", "train")
    np.testing.assert_array_equal(x, rows_of(adata, prepared.cell_names("Patient3", "BCRXL", "train")))


@pytest.mark.skipif(not KANG.is_file(), reason=f"real data not available: {KANG} (../shared/data beside the repo)")
def test_kang_sparse_with_pca_per_cell_type() -> None:
    adata = read_h5ad(KANG)
    assert sparse.issparse(adata.X)
    prepared = prepare(adata, DataSpec("condition", "control", split_by="cell_type", embed="pca:50", min_cells=20))
    assert len(prepared.maps) == 7 and {k.perturbation for k in prepared.maps} == {"stimulated"}
    assert prepared.dim == 50 and len(prepared.features) == 6998
    for key in prepared.maps:
        assert prepared.cells(key.group, key.perturbation, "test").shape[1] == 50
        assert prepared.cells(key.group, key.perturbation, "test", space="data").shape[1] == 6998
        markers = prepared.markers[key.name]
        assert len(markers) == 50 and len(set(markers)) == 50 and markers.max() < 6998
