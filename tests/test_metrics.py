"""Distances against direct loops and closed forms; evaluate_map's rows."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from scipy.spatial.distance import cdist

from engine.metrics import distances
from engine.metrics.distances import (
    MMD50_GAMMAS,
    MMD_GAMMAS,
    cosine,
    energy_distance,
    knn_enrichment,
    l2_means,
    l2_uvp,
    mmd,
    r_means,
    sinkhorn_divergence,
    squared_distances,
)
from engine.metrics.evaluate import MetricRow, evaluate_map


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one intra-op thread skips the pool's overhead (and its stalls on a busy host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cloud(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, d)) + shift)


def _mmd_loop(x: np.ndarray, y: np.ndarray, gammas, a=None, b=None) -> float:
    """The V-statistic written out as a double loop over points."""
    a = np.full(len(x), 1 / len(x)) if a is None else a / a.sum()
    b = np.full(len(y), 1 / len(y)) if b is None else b / b.sum()
    total = 0.0
    for gamma in gammas:
        k = lambda p, q: np.exp(-gamma * np.sum((p - q) ** 2))  # noqa: E731
        xx = sum(a[i] * a[j] * k(x[i], x[j]) for i in range(len(x)) for j in range(len(x)))
        yy = sum(b[i] * b[j] * k(y[i], y[j]) for i in range(len(y)) for j in range(len(y)))
        xy = sum(a[i] * b[j] * k(x[i], y[j]) for i in range(len(x)) for j in range(len(y)))
        total += xx + yy - 2 * xy
    return total / len(gammas)


def test_gamma_grids():
    assert MMD_GAMMAS == (2.0, 1.0, 0.5, 0.1, 0.01, 0.005)
    assert len(MMD50_GAMMAS) == 50 and MMD50_GAMMAS[0] == pytest.approx(10) and MMD50_GAMMAS[-1] == pytest.approx(1e-3)


def test_squared_distances_batched_and_nonnegative():
    x, y = _cloud(12, 3, 0).reshape(2, 6, 3), _cloud(10, 3, 1, shift=50.0).reshape(2, 5, 3)
    d2 = squared_distances(x, y)
    assert d2.shape == (2, 6, 5)
    for k in range(2):
        np.testing.assert_allclose(d2[k].numpy(), cdist(x[k].numpy(), y[k].numpy(), "sqeuclidean"), rtol=1e-10)
    assert (squared_distances(x, x) >= 0).all()


def test_mmd_matches_double_loop():
    x, y = _cloud(25, 3, 0), _cloud(20, 3, 1, shift=0.5)
    expected = _mmd_loop(x.numpy(), y.numpy(), MMD_GAMMAS)
    assert float(mmd(x, y)) == pytest.approx(expected, rel=1e-10)
    assert float(mmd(x, y, MMD50_GAMMAS)) == pytest.approx(_mmd_loop(x.numpy(), y.numpy(), MMD50_GAMMAS), rel=1e-10)


def test_weighted_mmd_matches_loop_and_uniform_weights_change_nothing():
    x, y = _cloud(15, 2, 0), _cloud(12, 2, 1, shift=1.0)
    w = torch.from_numpy(np.random.default_rng(2).uniform(0.1, 3.0, 15))
    expected = _mmd_loop(x.numpy(), y.numpy(), MMD_GAMMAS, a=w.numpy())
    assert float(mmd(x, y, x_weights=w)) == pytest.approx(expected, rel=1e-10)
    uniform = torch.full((15,), 7.0, dtype=torch.float64)
    assert float(mmd(x, y, x_weights=uniform, y_weights=torch.ones(12))) == pytest.approx(float(mmd(x, y)), rel=1e-12)
    assert float(mmd(x, y, x_weights=w)) != pytest.approx(float(mmd(x, y)), rel=1e-3)


def test_mmd_stack_with_zero_weight_padding_equals_each_map_alone():
    sizes = [(30, 20), (18, 25), (7, 9)]
    pairs = [(_cloud(n, 4, k), _cloud(m, 4, 10 + k, shift=0.3 * k)) for k, (n, m) in enumerate(sizes)]
    n_max, m_max = max(n for n, _ in sizes), max(m for _, m in sizes)
    x = torch.zeros(3, n_max, 4, dtype=torch.float64)
    y = torch.zeros(3, m_max, 4, dtype=torch.float64)
    a = torch.zeros(3, n_max, dtype=torch.float64)
    b = torch.zeros(3, m_max, dtype=torch.float64)
    for k, (xk, yk) in enumerate(pairs):
        x[k, : len(xk)], y[k, : len(yk)] = xk, yk
        a[k, : len(xk)], b[k, : len(yk)] = 1.0, 1.0
    stacked = mmd(x, y, x_weights=a, y_weights=b)
    assert stacked.shape == (3,)
    alone = torch.stack([mmd(xk, yk) for xk, yk in pairs])
    np.testing.assert_allclose(stacked.numpy(), alone.numpy(), rtol=1e-10, atol=1e-12)


def test_mmd_chunked_over_the_stack_equals_one_pass(monkeypatch: pytest.MonkeyPatch):
    x, y = _cloud(5 * 40, 3, 0).reshape(5, 40, 3), _cloud(5 * 30, 3, 1).reshape(5, 30, 3)
    one_pass = mmd(x, y)
    monkeypatch.setattr(distances, "_MMD_BUFFER_BYTES", 40 * 40 * 8 * 2 * 2)  # two maps per chunk
    np.testing.assert_allclose(mmd(x, y).numpy(), one_pass.numpy(), rtol=1e-12, atol=0)


def test_mmd_of_a_cloud_with_itself_is_zero_and_2d_gives_a_scalar():
    x = _cloud(50, 5, 0).float() * 3 + 4
    value = mmd(x, x)
    assert value.dim() == 0 and abs(float(value)) < 1e-6
    assert float(mmd(x, x + 1.0)) > 0.01


def test_energy_distance_matches_scipy():
    x, y = _cloud(30, 3, 0), _cloud(25, 3, 1, shift=0.7)
    xn, yn = x.numpy(), y.numpy()
    expected = 2 * cdist(xn, yn).mean() - cdist(xn, xn).mean() - cdist(yn, yn).mean()
    assert float(energy_distance(x, y)) == pytest.approx(expected, rel=1e-8)
    assert float(energy_distance(x, x)) == pytest.approx(0.0, abs=1e-6)


def test_sinkhorn_divergence_is_zero_on_itself_and_half_squared_shift_on_translation():
    x = _cloud(200, 5, 0)
    assert sinkhorn_divergence(x, x) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, -0.5, 0.0, 2.0, 0.5], dtype=torch.float64)
    # cost 0.5||x - y||^2: a translation by t costs exactly 0.5 ||t||^2 after debiasing
    assert sinkhorn_divergence(x, x + shift) == pytest.approx(0.5 * float(shift.square().sum()), rel=1e-3)
    assert sinkhorn_divergence(x.numpy(), _cloud(150, 5, 1).numpy()) > 0


def test_sinkhorn_divergence_matches_converged_pot_primal():
    """OT_eps = <P, C> + eps KL(P | a x b) with POT's plan after thousands of plain Sinkhorn iterations."""
    x, y = 0.5 * _cloud(40, 2, 0).numpy(), 0.5 * _cloud(30, 2, 1, shift=1.0).numpy()
    eps = 0.01

    def entropic(p: np.ndarray, q: np.ndarray) -> float:
        a, b = np.full(len(p), 1 / len(p)), np.full(len(q), 1 / len(q))
        cost = 0.5 * cdist(p, q, "sqeuclidean")
        plan = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=5000, stopThr=1e-9, warn=False)
        positive = plan > 0
        kl = np.sum(plan[positive] * np.log(plan[positive] / np.outer(a, b)[positive]))
        return float(np.sum(plan * cost) + eps * kl)

    expected = entropic(x, y) - 0.5 * (entropic(x, x) + entropic(y, y))
    assert sinkhorn_divergence(x, y, eps) == pytest.approx(expected, rel=1e-3)


def test_means():
    x = _cloud(100, 6, 0)
    y = 2 * x + torch.arange(6.0, dtype=torch.float64)  # mean vector affine in the mean of x
    expected_l2 = np.linalg.norm(x.numpy().mean(0) - y.numpy().mean(0))
    assert float(l2_means(x, y)) == pytest.approx(expected_l2, rel=1e-10)
    assert float(r_means(x, x)) == pytest.approx(1.0)
    assert float(r_means(x, -3 * x)) == pytest.approx(-1.0)
    assert float(r_means(x, y)) == pytest.approx(np.corrcoef(x.numpy().mean(0), y.numpy().mean(0))[0, 1], rel=1e-10)
    stack = torch.stack([x, y])
    np.testing.assert_allclose(l2_means(stack, stack.flip(0)).numpy(), [expected_l2, expected_l2], rtol=1e-10)


def test_knn_enrichment():
    same = float(knn_enrichment(_cloud(400, 3, 0), _cloud(400, 3, 1), k=50))
    assert 0.4 < same < 0.6
    assert float(knn_enrichment(_cloud(300, 3, 0), _cloud(300, 3, 1, shift=100.0), k=50)) == 1.0
    # the query cell itself is excluded: each predicted cell's nearest neighbour is an observed one
    pred, obs = torch.tensor([[0.0], [10.0]]), torch.tensor([[0.1], [10.1]])
    assert float(knn_enrichment(pred, obs, k=1)) == 0.0
    chunked = knn_enrichment(_cloud(70, 2, 0), _cloud(50, 2, 1), k=10, chunk=16)
    assert float(chunked) == float(knn_enrichment(_cloud(70, 2, 0), _cloud(50, 2, 1), k=10))


def test_knn_enrichment_rejects_k_that_covers_the_union():
    pred, obs = _cloud(3, 2, 0), _cloud(3, 2, 1, shift=100.0)
    assert float(knn_enrichment(pred, obs, k=4)) == pytest.approx(0.5)  # k = n + m - 2: the largest allowed
    for k in (0, 5, 50):  # k = n + m - 1 would give (n - 1) / (n + m - 1) = 0.4 for any cells
        with pytest.raises(ValueError, match="1 <= k <= 4"):
            knn_enrichment(pred, obs, k=k)


def test_ground_truth_metrics():
    x = _cloud(100, 3, 0)
    t_star = x + 1.0
    assert float(l2_uvp(t_star, t_star, 3.0)) == 0.0
    assert float(l2_uvp(t_star + 0.5, t_star, 3.0)) == pytest.approx(100 * 0.75 / 3.0)
    assert float(cosine(t_star - x, t_star - x)) == pytest.approx(1.0)
    assert float(cosine(x - t_star, t_star - x)) == pytest.approx(-1.0)


SPLITS = ("test", "test_identity", "test_observed")
NAMES = {"mmd", "mmd50", "l2_means", "r_means", "r2_means", "energy", "sinkhorn_div_eps0.01", "knn_enrich50",
         "mmd_weighted"}


def _populations(scale: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    target = lambda n: (rng.normal(size=(n, 6)) + np.linspace(0, 3, 6)).astype(np.float32)  # noqa: E731
    return {
        "pred": target(150 * scale),
        "target_test": target(120 * scale),
        "source_test": rng.normal(size=(130 * scale, 6)).astype(np.float32),
        "target_train": target(300 * scale),
    }


def test_evaluate_map_rows_for_all_splits_and_model_beats_identity():
    cells = _populations()
    rows = evaluate_map(**cells, seed=3)
    assert all(isinstance(r, MetricRow) and isinstance(r.value, float) for r in rows)
    table = {(r.split, r.metric): r.value for r in rows}
    assert len(table) == len(rows)
    for split in ("test", "test_identity", "test_observed"):
        assert {m for s, m in table if s == split} == NAMES
    for metric in ("mmd", "mmd50", "l2_means", "energy", "sinkhorn_div_eps0.01", "knn_enrich50"):
        assert table["test", metric] < table["test_identity", metric], metric
    assert table["test", "r_means"] > table["test_identity", "r_means"]
    assert table["test", "r2_means"] == pytest.approx(table["test", "r_means"] ** 2)
    assert 0.35 < table["test_observed", "knn_enrich50"] < 0.65  # 300 vs 120 cells: compared at equal sizes
    assert rows == evaluate_map(**cells, seed=3)


def test_evaluate_map_options():
    cells = _populations(scale=4)
    weights = np.random.default_rng(1).uniform(0.5, 2.0, len(cells["pred"]))
    rows = evaluate_map(**cells, features=np.array([0, 2, 5]), pred_weights=weights, bootstrap=3,
                        seed=1, knn=False, sinkhorn=False, max_cells=100)
    table = {(r.split, r.metric): r.value for r in rows}
    boot = {f"{m}_boot_{s}" for m in ("mmd", "l2_means") for s in ("mean", "std")}
    expected = (NAMES - {"sinkhorn_div_eps0.01", "knn_enrich50"}) | boot
    assert {m for s, m in table if s == "test"} == expected
    assert {m for s, m in table if s == "test_identity"} == expected
    assert table["test", "mmd_weighted"] != table["test", "mmd"]
    assert table["test_identity", "mmd_weighted"] == table["test_identity", "mmd"]  # uniform weights
    assert table["test", "mmd_boot_std"] > 0
    # l2_means uses every cell of the selected features
    full = {k: torch.from_numpy(v[:, [0, 2, 5]].astype(np.float64)) for k, v in cells.items()}
    assert table["test", "l2_means"] == pytest.approx(float(l2_means(full["pred"], full["target_test"])), rel=1e-6)
    assert rows != evaluate_map(**cells, features=np.array([0, 2, 5]), pred_weights=weights, bootstrap=3,
                                seed=2, knn=False, sinkhorn=False, max_cells=100)


def test_weighted_mmd_weights_the_prediction_and_balanced_rows_equal_the_mmd():
    """mmd_weighted of `test` is the MMD with the predicted cells weighted (every cell kept: no
    subsample); without weights, and for every baseline split, it is the split's mmd."""
    cells = _populations()
    weights = np.random.default_rng(2).uniform(0.1, 3.0, len(cells["pred"]))
    table = _table(evaluate_map(**cells, pred_weights=weights, knn=False, sinkhorn=False))
    as_tensor = {k: torch.from_numpy(v.astype(np.float64)) for k, v in cells.items()}
    expected = mmd(as_tensor["pred"], as_tensor["target_test"], MMD_GAMMAS, x_weights=torch.from_numpy(weights))
    assert table["test", "mmd_weighted"] == pytest.approx(float(expected), rel=1e-9)
    assert table["test", "mmd_weighted"] != pytest.approx(table["test", "mmd"], rel=1e-3)
    for split in ("test_identity", "test_observed"):
        assert table[split, "mmd_weighted"] == table[split, "mmd"]
    balanced = _table(evaluate_map(**cells, knn=False, sinkhorn=False))
    assert balanced["test", "mmd_weighted"] == balanced["test", "mmd"]


def _table(rows: list[MetricRow]) -> dict[tuple[str, str], float]:
    return {(r.split, r.metric): r.value for r in rows}


def test_evaluate_map_splits_do_not_depend_on_options_or_on_the_other_splits():
    """Each (population, purpose) has its own random stream: train (no bootstrap) and evaluate agree."""
    cells = _populations(scale=2)
    base = _table(evaluate_map(**cells, seed=5, max_cells=150))  # every population subsampled
    assert all(math.isfinite(v) for v in base.values())
    weights = np.random.default_rng(1).uniform(0.5, 2.0, len(cells["pred"]))
    variants = [  # (options, the metrics they drop)
        ({"bootstrap": 10}, set()),
        ({"sinkhorn": False}, {"sinkhorn_div_eps0.01"}),
        ({"knn": False}, {"knn_enrich50"}),
        ({"bootstrap": 10, "knn": False, "sinkhorn": False, "pred_weights": weights},
         {"sinkhorn_div_eps0.01", "knn_enrich50"}),
    ]
    boots = []
    for options, dropped in variants:
        table = _table(evaluate_map(**cells, seed=5, max_cells=150, **options))
        shared = {key for key in table if key in base}
        if "pred_weights" in options:  # the weights change the model's weighted MMD, nothing else
            assert table["test", "mmd_weighted"] != base["test", "mmd_weighted"]
            shared.discard(("test", "mmd_weighted"))
        assert {m for _, m in shared} == NAMES - dropped, options
        assert {key: table[key] for key in shared} == {key: base[key] for key in shared}, options
        if "bootstrap" in options:
            boots.append({key: v for key, v in table.items() if "_boot_" in key[1]})
    assert len(boots[0]) == 3 * 4 and boots[0] == boots[1]
    # another prediction changes the model's rows only
    moved = _table(evaluate_map(**{**cells, "pred": cells["pred"] + 1.0}, seed=5, max_cells=150))
    assert moved["test", "mmd"] != base["test", "mmd"]
    assert {k: v for k, v in moved.items() if k[0] != "test"} == {k: v for k, v in base.items() if k[0] != "test"}


def test_evaluate_map_seed_decides_the_subsamples():
    cells = _populations(scale=2)
    options = {"sinkhorn": False, "max_cells": 120}
    rows = _table(evaluate_map(**cells, seed=0, **options))
    assert rows == _table(evaluate_map(**cells, seed=0, **options))
    other = _table(evaluate_map(**cells, seed=1, **options))
    for split in SPLITS:
        for metric in ("mmd", "mmd50", "energy", "knn_enrich50"):  # on subsamples of 120 cells
            assert other[split, metric] != rows[split, metric], (split, metric)
        for metric in ("l2_means", "r_means"):  # on every cell
            assert other[split, metric] == rows[split, metric], (split, metric)


def test_evaluate_map_knn_enrichment_needs_2k_cells_per_side():
    rng = np.random.default_rng(0)
    cloud = lambda n, shift=0.0: rng.normal(size=(n, 5)) + shift  # noqa: E731
    small = _table(evaluate_map(cloud(30, 1.0), cloud(30, 1.0), cloud(30), cloud(30, 1.0), seed=0))
    for split in SPLITS:  # 30 cells per side: k = 50 would cover the union, the value (n-1)/(2n-1) for all
        assert math.isnan(small[split, "knn_enrich50"]), split
        assert all(math.isfinite(v) for (s, m), v in small.items() if s == split and m != "knn_enrich50")
    pred, target, source, train = cloud(100, 1.0), cloud(100, 1.0), cloud(110), cloud(150, 1.0)
    large = _table(evaluate_map(pred, target, source, train, seed=0, sinkhorn=False))
    assert all(math.isfinite(v) for v in large.values())
    assert large["test", "knn_enrich50"] < 0.6 < large["test_identity", "knn_enrich50"]
    below = _table(evaluate_map(pred[:99], target, source, train, seed=0, sinkhorn=False))
    assert math.isnan(below["test", "knn_enrich50"])  # 99 < 2k predicted cells
    for split in ("test_identity", "test_observed"):
        assert below[split, "knn_enrich50"] == large[split, "knn_enrich50"]
