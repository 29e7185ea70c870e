"""NubOT (engine.solvers.nubot) on the paper's synthetic experiment: three 2-D Gaussian clusters,
a constant shift, cluster proportions changing from p (source) to q (target); the true weight of
cluster k is q_k / p_k (Lübeck et al. 2022, table 1). The solver contract (stacked = alone,
checkpoints, prediction, divergence) is in test_solver_contract.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.data.synthetic import CLUSTER_CENTRES, CLUSTER_SETTINGS, CLUSTER_SHIFT, make_clusters
from engine.solvers import build_solver

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = tuple(CLUSTER_SETTINGS)


def cells_of(adata, setting: str, condition: str) -> tuple[np.ndarray, np.ndarray]:
    """Cells [n, 2] and cluster labels [n] of one setting (group) and condition."""
    keep = ((adata.obs["group"] == setting) & (adata.obs["condition"] == condition)).to_numpy()
    return adata.X[keep], adata.obs["cluster"].to_numpy()[keep]


def per_cluster_weights(weights: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Mean weight per source cluster [3], the weights first normalised to mean 1."""
    weights = weights / weights.mean()
    return np.array([weights[clusters == c].mean() for c in range(3)])


def nearest_own_centre(moved: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Per source cluster [3]: the fraction of its images nearest to its own shifted centre."""
    nearest = np.argmin(((moved[:, None] - (CLUSTER_CENTRES + CLUSTER_SHIFT)[None]) ** 2).sum(-1), axis=1)
    return np.array([(nearest[clusters == c] == c).mean() for c in range(3)])


def test_identity_map_is_not_the_right_matching():
    """The shift is longer than half the distance between centres: without moving, most of cluster
    2's cells lie nearest to cluster 1's shifted centre (so the image tests can fail)."""
    x, clusters = cells_of(make_clusters(500, ("a",), seed=0), "a", "control")
    assert nearest_own_centre(x, clusters)[1] < 0.5


@pytest.mark.parametrize("setting", SETTINGS)
def test_masses_of_the_true_map_give_the_growth_factors(setting):
    """Algorithm 1, lines 5-8, at the true map (T = x + shift, S = y - shift), one batch of 400:
    e alone is about sqrt(q / p) and z about sqrt(p / q) (the plan's mass on a pair of clusters is
    ~ (pq)^0.52), but e / z, the weight NubOT predicts (eta / zeta(T(x))), is the batch's q / p
    (the proportions drawn) within 0.1."""
    adata = make_clusters(400, (setting,), seed=1)
    (x, cx), (y, cy) = cells_of(adata, setting, "control"), cells_of(adata, setting, "shifted")
    solver = build_solver("nubot", 1, 2)
    shift = torch.tensor(CLUSTER_SHIFT, dtype=torch.float32)
    e = solver.relative_masses(torch.from_numpy(x)[None] + shift, torch.from_numpy(y)[None])[0].numpy()
    z = solver.relative_masses(torch.from_numpy(y)[None] - shift, torch.from_numpy(x)[None])[0].numpy()
    e_cluster = np.array([e[cx == c].mean() for c in range(3)])
    z_cluster = np.array([z[cy == c].mean() for c in range(3)])
    truth = np.bincount(cy, minlength=3) / np.bincount(cx, minlength=3)
    ratio = e_cluster / z_cluster
    np.testing.assert_allclose(ratio / (ratio @ np.bincount(cx, minlength=3) / len(cx)), truth, atol=0.1)
    assert np.abs(e_cluster - truth).max() > 0.2  # e alone is not the growth factor


def test_divergence_guard_freezes_a_map_whose_transport_cost_explodes():
    """A map whose transport_cost exceeds solver.max_transport_cost (default 10) is logged inf,
    marked diverged and left at its step-0 state (its best); the other map of the stack goes on.
    Map 1's g starts at 0.5 * 30 |x|^2 (T(x) = 30 x: squared displacements ~100 times the data's spread)."""
    from engine.train.loop import TrainConfig, train_stack
    from engine.train.stack_data import StackData

    rng = np.random.default_rng(0)
    x = [rng.normal(size=(200, 2)).astype(np.float32) for _ in range(2)]
    y = [cells + 0.5 for cells in x]
    data = StackData(x, y, x, y, seeds=[1, 2], batch_size=64)
    solver = build_solver("nubot", 2, 2, {"hidden": [16, 16], "weight_hidden": [16]})
    solver.initialize(data, [1, 2])
    with torch.no_grad():
        solver.g.quadratic.matrix[1] *= 30.0
    start = solver.snapshot()
    outcome = train_stack(solver, data, TrainConfig(steps=4, eval_every=2))
    assert outcome.diverged == [False, True]
    assert outcome.history[1]["transport_cost"][1] == float("inf")
    assert outcome.history[1]["transport_cost"][0] < 1.0
    final = solver.snapshot()
    assert all(torch.equal(final[name][1], start[name][1]) for name in start)
    assert all(np.isfinite(row["transport_cost"][0]) for row in outcome.history[1:])  # map 0 trained on


# -- training: the paper's experiment (slow) -------------------------------------------------------
# Not yet seen passing: on the shared 2-core machine (load 30-45) these were never run to the end.
# Exploratory runs of the same stack (tmp script, 2000 cells per population): lr 1e-3 diverged by
# step 300 (setting b moved by (134, 86)); lr 3e-4 was still wandering at step 500 (setting a's
# weights (0.74, 1.47, 0.78) against (1.35, 1.35, 0.30)). SYNTHETIC_STEPS / SYNTHETIC_OPTIONS are a
# first guess to be tuned on a free machine (the paper: lr 1e-4, 10k steps).

SYNTHETIC_STEPS = 1500
SYNTHETIC_OPTIONS = {"lr": 3e-4, "weight_hidden": [32, 32]}  # eta, zeta 32 wide on the 2-D data, as the paper
BATCH = 400  # the paper's batches of 400 samples
NOT_MET = pytest.mark.xfail(reason="issue 12 acceptance not met yet: NubOT's min-max did not converge in "
                                   "exploratory runs; steps and lr still to be tuned", strict=False)


def assert_weights_and_images(weights: np.ndarray, moved: np.ndarray, clusters: np.ndarray, setting: str) -> None:
    """Mean weight per source cluster (normalised to mean 1) within 0.15 of q / p, and >= 95% of
    each cluster's images nearest its own shifted centre."""
    found, near = per_cluster_weights(weights, clusters), nearest_own_centre(moved, clusters)
    truth = CLUSTER_SETTINGS[setting].growth
    assert np.abs(found - truth).max() <= 0.15, (setting, found.round(3), truth.round(3), near)
    assert near.min() >= 0.95, (setting, near)


@pytest.mark.slow
@NOT_MET
def test_synthetic_experiment_recovers_growth_factors_in_all_three_settings():
    """Settings a, b, c of table 1 as one stack of 3 maps (4000 cells per population, seed 11),
    SYNTHETIC_STEPS steps with SYNTHETIC_OPTIONS, best state by weighted validation MMD; scored on
    4000 fresh control cells per setting (seed 12)."""
    from engine.train.loop import TrainConfig, train_stack
    from engine.train.stack_data import StackData

    train, fresh = make_clusters(4000, SETTINGS, seed=11), make_clusters(4000, SETTINGS, seed=12)
    valid = make_clusters(500, SETTINGS, seed=13)
    populations = {name: [cells_of(adata, s, condition)[0] for s in SETTINGS]
                   for name, adata, condition in (("source", train, "control"), ("target", train, "shifted"),
                                                  ("valid_source", valid, "control"), ("valid_target", valid, "shifted"))}
    seeds = [101, 102, 103]
    data = StackData(**populations, seeds=seeds, batch_size=BATCH)
    solver = build_solver("nubot", 3, 2, SYNTHETIC_OPTIONS)
    solver.initialize(data, seeds)
    outcome = train_stack(solver, data, TrainConfig(steps=SYNTHETIC_STEPS, batch_size=BATCH, eval_every=100))
    assert outcome.diverged == [False] * 3
    x = [cells_of(fresh, s, "control") for s in SETTINGS]
    moved = solver.transport(torch.from_numpy(np.stack([cells for cells, _ in x])))
    for k, setting in enumerate(SETTINGS):
        assert_weights_and_images(moved.weights[k].numpy(), moved.cells[k].numpy(), x[k][1], setting)


@pytest.mark.slow
@NOT_MET
def test_cli_trains_setting_b_and_predicts_its_weights(ray_session, tmp_path):
    """`perturbot train --solver nubot` on setting b (4000 cells per population, seed 21): the
    predictions file's obs['weight'] of the held-out controls recovers (2.1, 0.6, 0.3)."""
    import anndata as ad

    from engine.cli import main

    adata = make_clusters(4000, ("b",), seed=21)
    path = tmp_path / "clusters.h5ad"
    adata.write_h5ad(path)
    options = [f"solver.{key}={value}".replace(" ", "") for key, value in SYNTHETIC_OPTIONS.items()]
    argv = ["train", "--data", str(path), "--condition-key", "condition", "--control", "control",
            "--split-by", "group", "--solver", "nubot", "--steps", str(SYNTHETIC_STEPS), "--workers", "1",
            "--set", f"train.batch_size={BATCH}", "--set", "train.eval_every=100", "--out", str(tmp_path / "run")]
    for option in options:
        argv += ["--set", option]
    assert main(argv) == 0
    predicted = ad.read_h5ad(tmp_path / "run" / "predictions.h5ad")
    assert (predicted.obs["perturbation"] == "shifted").all()
    clusters = adata.obs["cluster"].loc[predicted.obs["source_cell"].to_numpy()].to_numpy()
    assert_weights_and_images(predicted.obs["weight"].to_numpy(), predicted.X, clusters, "b")
