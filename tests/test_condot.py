"""CondOT (engine.solvers.condot) and its PICNN (engine.nn.picnn): convexity, the initialisation per
training context, contexts from obs keys, held-out contexts. The solver-contract tests
(tests/test_solver_contract.py) also run on condot, as on every registered solver."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.nn.picnn import StackedPICNN
from engine.ot.gaussian import bures_map, gaussian_moments
from engine.solvers import build_solver
from engine.train.stack_data import StackData

pytestmark = pytest.mark.usefixtures("one_thread")


def random_picnn(seed: int, n_models: int = 2, dim: int = 3, context_dim: int = 2, j: int = 3) -> StackedPICNN:
    """A PICNN with every parameter and buffer random (A_j PSD), far from its initialisation."""
    gen = torch.Generator().manual_seed(seed)
    net = StackedPICNN(n_models, dim, context_dim, j, hidden=(8, 8)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        root = torch.randn(n_models, j, dim, dim, generator=gen, dtype=torch.float64)
        net.matrices.copy_(root @ root.transpose(-1, -2))
        net.centers.copy_(torch.randn(net.centers.shape, generator=gen, dtype=torch.float64))
    return net


def midpoint_gaps(net: StackedPICNN, seed: int, n: int = 4000, vary: str = "x") -> torch.Tensor:
    """psi(mid) - (psi(a) + psi(b)) / 2 over random pairs differing in x (context fixed) or in c
    (x fixed); convexity in that argument means every gap <= 0."""
    gen = torch.Generator().manual_seed(seed)
    m, d, q = net.matrices.shape[0], net.matrices.shape[-1], net.modulator.weight.shape[1]
    x0, x1 = (3 * torch.randn(m, n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    c0, c1 = (2 * torch.randn(m, n, q, generator=gen, dtype=torch.float64) for _ in range(2))
    if vary == "x":
        c1 = c0
    else:
        x1 = x0
    return net((x0 + x1) / 2, (c0 + c1) / 2) - (net(x0, c0) + net(x1, c1)) / 2


def test_picnn_is_convex_in_x_for_any_fixed_context():
    """Random PICNNs (3 seeds x 2 stacked models, every weight N(0, 1)) with W^z clamped >= 0:
    psi(., c) is midpoint-convex on 4000 random pairs per model (gap <= 1e-9 relative to the
    values); in the context it is not (some gap > 0), and without the clamp convexity in x fails."""
    for seed in range(3):
        net = random_picnn(seed)
        unclamped = midpoint_gaps(net, seed)
        net.clamp_hidden_weights()
        gaps = midpoint_gaps(net, seed)
        assert gaps.max().item() <= 1e-9 * (1 + gaps.abs().max().item()), f"seed {seed}: not convex in x"
        assert midpoint_gaps(net, seed, vary="c").max().item() > 0, "a convex-in-c network would not test much"
        assert unclamped.max().item() > 0, "negative W^z should break convexity somewhere"


def gaussian_contexts(dim: int = 4, n: int = 3000, seed: int = 0) -> tuple[list, list, np.ndarray]:
    """Source N(0, I) (shared) and one target Gaussian per context (its own mean and covariance);
    contexts: doses on a log scale (scalars 0.25 .. 1)."""
    rng = np.random.default_rng(seed)
    source = rng.normal(size=(n, dim)).astype(np.float32)
    targets = []
    for j in range(4):
        a = np.eye(dim) + 0.3 * rng.normal(size=(dim, dim))
        targets.append((rng.normal(size=dim) * 2 + rng.normal(size=(n, dim)) @ a).astype(np.float32))
    return [source] * 4, targets, np.array([[0.25], [0.5], [0.75], [1.0]], np.float32)


def condot_at_init(init: str = "gaussian") -> tuple[StackData, object]:
    sources, targets, contexts = gaussian_contexts()
    data = StackData(sources, targets, sources, targets, seeds=[1, 2, 3, 4], batch_size=64, contexts=contexts)
    solver = build_solver("condot", 4, 4, {"hidden": [16, 16], "init": init}, context_dim=1)
    solver.initialize(data, [7])
    return data, solver


def test_gaussian_init_maps_each_training_context_to_its_target_fit():
    """At step 0, for each of 4 training contexts, grad_x g(., c_j) is the Bures map of context j:
    within 1e-3 of it on every source cell (the softmax leak, e^-10 per other context); the mapped
    source has the target's mean within 1e-3 and covariance within 0.05 (Frobenius; the Bures map
    matches the fits with a 1e-2 ridge) of that context's target fit."""
    data, solver = condot_at_init()
    x = data.source.of_map(0).double()
    moved = solver.double().transport(x.expand(4, -1, -1), data.contexts.double()).cells
    for j in range(4):
        target = data.target.of_map(j).double()
        a, b = bures_map(*gaussian_moments(x), *gaussian_moments(target))
        assert (moved[j] - (x @ a + b)).abs().max().item() < 1e-3
        mean, cov = gaussian_moments(moved[j], 0.0)
        mean_t, cov_t = gaussian_moments(target, 0.0)
        assert (mean - mean_t).norm().item() < 1e-3
        assert (cov - cov_t).norm().item() < 0.05 * max(1.0, cov_t.norm().item()) and (cov - cov_t).norm().item() < 0.05


def test_identity_init_and_unseen_contexts_mix_their_neighbours():
    """identity init: T(x, c) = x for every context (1e-6). gaussian init: a context halfway between
    two training contexts gets the mean of their two Bures maps (the softmax weighs the two equally
    and the others by e^-40 at most), so an unseen dose starts between its neighbours."""
    data, solver = condot_at_init("identity")
    x = data.source.of_map(0)[:500]
    moved = solver.transport(x.expand(4, -1, -1), data.contexts).cells
    assert (moved - x).abs().max().item() < 1e-6
    data, solver = condot_at_init("gaussian")
    halfway = torch.tensor([[0.625]])
    mixed = solver.transport(x.unsqueeze(0), halfway).cells[0]
    neighbours = solver.transport(x.expand(2, -1, -1), data.contexts[1:3]).cells
    assert (mixed - neighbours.mean(0)).abs().max().item() < 1e-3


def test_deep_set_starts_as_the_additive_combinator_and_is_trained():
    """The deep set at its start: for 0/1 multi-hot contexts over q <= 8 parts, C(c) = 1/2 +
    (sigmoid(2) - 1/2) c with sum and max pool (1e-6); over q = 12 > 8 parts (random codes) it is
    still invariant to the order of the parts (a set) and in (0, 1). CondOT with the deep set: one
    training step changes its weights (it is on g's optimizer), f and g read the same module, and a
    fresh solver loaded from the state dict transports identically."""
    from engine.nn.deepset import DeepSet

    multi_hot = torch.tensor([[[1.0, 0, 0], [1, 1, 0], [0, 1, 1], [1, 1, 1]]])
    for pool in ("sum", "max"):
        net = DeepSet(1, 3, pool)
        net.init_model(0, torch.Generator().manual_seed(0))
        expected = 0.5 + (torch.sigmoid(torch.tensor(2.0)) - 0.5) * multi_hot
        assert (net(multi_hot) - expected).abs().max().item() < 1e-6
    wide = DeepSet(1, 12, "max")
    wide.init_model(0, torch.Generator().manual_seed(0))
    parts = torch.zeros(1, 2, 12)
    parts[0, 0, [1, 7]] = 1.0
    parts[0, 1, [7, 1]] = 1.0
    out = wide(parts)
    assert torch.equal(out[0, 0], out[0, 1]) and ((out > 0) & (out < 1)).all()

    sources, targets, _ = gaussian_contexts(dim=3, n=500)
    contexts = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1]], np.float32)
    data = StackData(sources, targets, sources, targets, seeds=[1, 2, 3, 4], batch_size=64, contexts=contexts)
    options = {"hidden": [8], "combinator": "deepset", "inner_steps": 1, "lr": 1e-2}
    solver = build_solver("condot", 4, 3, options, context_dim=3)
    solver.initialize(data, [7])
    before = {k: v.clone() for k, v in solver.combinator.state_dict().items()}
    solver.start_training(solver.plan(solver.config, 1))
    solver.train_step(data, 0, solver.plan(solver.config, 1).phases[0])
    assert any(not torch.equal(before[k], v) for k, v in solver.combinator.state_dict().items())
    fresh = build_solver("condot", 4, 3, options, context_dim=3)
    fresh.load_state_dict(solver.state_dict())
    x = data.source.of_map(0)[:50].expand(2, -1, -1)
    new_pair = torch.tensor([[1.0, 1, 0], [0, 1, 1]])
    assert torch.equal(fresh.transport(x, new_pair).cells, solver.transport(x, new_pair).cells)


# -- contexts from obs keys, held-out contexts, the dose-response acceptance -----------------------------


class Collect:
    """An in-memory Reporter (engine.train.worker): the rows a worker would send to the store."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.map_rows: list[dict] = []

    def metrics(self, rows: list[dict]) -> None:
        self.rows += rows

    def maps(self, rows: list[dict]) -> None:
        self.map_rows += rows

    def progress(self, stack: str, done: int) -> bool:
        return False


def condot_run(tmp_path, adata, steps: int, data: dict, eval_every: int = 50, **solver):
    """CondOT trained through the worker's job without Ray: (prepared, reporter, run directory)."""
    from engine.config import RunConfig
    from engine.data import prepare
    from engine.rundir import RunDir
    from engine.train.worker import MapRun, train_maps

    config = RunConfig.resolve(dataset="x", solver="condot", steps=steps, seed=0, **data,
                               solver_params={"hidden": [32, 32], **solver}, train_params={"eval_every": eval_every})
    prepared = prepare(adata, config.data)
    reporter = Collect()
    run_dir = RunDir(tmp_path / "run")
    train_maps(MapRun(prepared, config, run_dir, reporter, torch.device("cpu"), "r"), prepared.maps)
    return prepared, reporter, run_dir


def dose_run(tmp_path, steps: int, **solver):
    """The synthetic dose response (doses 10..10000, dose 1000 held out, log embedding)."""
    from engine.data import make_dose_response

    data = dict(condition_key="dose", control="0", holdout=["dose", "1000"], context_keys=["dose"],
                embeddings=["dose=log"])
    return condot_run(tmp_path, make_dose_response(seed=0), steps, data, **solver)


def final_mmd(reporter: Collect, name: str) -> dict[str, float]:
    """The final test rows (model and baselines) of map `name`: {split: mmd}."""
    return {r["split"]: r["value"] for r in reporter.rows if r["perturbation"] == name and r["metric"] == "mmd"
            and r["split"].startswith("test")}


def test_held_out_dose_is_an_unseen_context(tmp_path):
    """--holdout dose=1000 with context keys: the 1000 map has test cells only (no train or valid
    cells), the others train; contexts are log10(dose) / 4; without context keys the same holdout
    is an empty-split error, and a context key that is not a map's label is refused."""
    from engine.data import DataError, DataSpec, make_dose_response, prepare
    from engine.data.contexts import map_contexts

    adata = make_dose_response(n_cells=100)
    spec = DataSpec("dose", "0", holdout=("dose", "1000"), context_keys=("dose",), embeddings=("dose=log",))
    prepared = prepare(adata, spec)
    trained = {k.perturbation: prepared.has_training_cells(k) for k in prepared.maps}
    assert trained == {"10": True, "100": True, "1000": False, "10000": True}
    assert len(prepared.cells(None, "1000", "test")) == 100 and len(prepared.cells(None, "1000", "valid")) == 0
    np.testing.assert_allclose(map_contexts(prepared, prepared.maps).ravel(), [0.25, 0.5, 0.75, 1.0])
    with pytest.raises(DataError, match="empty split"):
        prepare(adata, DataSpec("dose", "0", holdout=("dose", "1000")))
    with pytest.raises(DataError, match="context key"):
        DataSpec("dose", "0", context_keys=("donor",))
    adata.obs["dose"] = adata.obs["dose"].replace({"10000": "high"})
    with pytest.raises(DataError, match="numeric"):
        prepare(adata, DataSpec("dose", "0", context_keys=("dose",), embeddings=("dose=value",)))


@pytest.mark.parametrize("steps, solver", [(20, {"inner_steps": 2}), pytest.param(1000, {}, marks=pytest.mark.slow)])
def test_held_out_dose_beats_identity_and_the_nearest_seen_doses(tmp_path, steps, solver):
    """Acceptance (synthetic dose response, d = 5, shift = log10(dose) along a fixed direction, dose
    1000 held out): after 20 min-max steps (2 g-steps each; slow: 1000 steps of the paper's loop, 10
    g-steps each) CondOT's prediction for dose 1000 has a lower mmd to the
    true held-out population than identity, than the Bures map of the nearest seen dose (the
    test_gaussian row, the engine's nearest: dose 100), than that dose's observed cells, and than
    CondOT's own maps of both neighbouring doses (100 and 10000) applied to the same controls."""
    from engine.metrics.evaluate import evaluate_map
    from engine.train.saved_maps import SavedMaps, predict_cells

    prepared, reporter, run_dir = dose_run(tmp_path, steps, **solver)
    final = final_mmd(reporter, "1000")
    assert set(final) == {"test", "test_identity", "test_observed", "test_mean_shift", "test_gaussian"}
    assert final["test"] < final["test_identity"] and final["test"] < final["test_gaussian"]
    assert final["test"] < final["test_observed"]
    saved = SavedMaps(run_dir.saved_maps()[0])
    assert saved.names == ["10", "100", "1000", "10000"] and saved.solver.n_maps == 3
    controls, truth = prepared.cells(None, "0", "test"), prepared.cells(None, "1000", "test")
    by_neighbour = predict_cells(saved.solver, [controls, controls], saved.device, saved.contexts[[1, 3]])
    neighbours = []
    for cells, _ in by_neighbour:
        rows = evaluate_map(cells, truth, controls, truth, knn=False, sinkhorn=False)
        neighbours.append(next(r.value for r in rows if r.split == "test" and r.metric == "mmd"))
    print("dose 1000 mmd:", final, "CondOT at doses 100, 10000:", neighbours)
    assert final["test"] < min(neighbours)


@pytest.mark.parametrize("steps, solver", [
    (20, {"inner_steps": 2}),
    (20, {"inner_steps": 2, "combinator": "deepset"}),
    (20, {"inner_steps": 2, "combinator": "deepset", "pool": "max"}),
    pytest.param(300, {"inner_steps": 2, "combinator": "deepset", "lr": 1e-3, "contexts_per_step": 0},
                 marks=pytest.mark.slow),
])
def test_held_out_pair_beats_either_single_perturbation(tmp_path, steps, solver):
    """Acceptance (synthetic combinations: singles A, B, C shift the controls along orthonormal
    directions, a pair by the sum; "A+B" held out, multi-hot contexts), with the sum combinator and
    the deep set (sum or max pool): after 20 min-max steps (slow: 300 steps at lr 1e-3, every context
    each step, the deep set trained) the prediction for A+B has a lower mmd to the true A+B cells
    than identity, than A's Bures map and A's cells (the nearest trained context: the test_gaussian
    and test_observed rows), and than B's cells (predicting either single perturbation alone)."""
    from engine.data import make_combinations
    from engine.metrics.evaluate import evaluate_map

    adata = make_combinations(seed=1)
    data = dict(condition_key="condition", control="control", holdout=["condition", "A+B"],
                context_keys=["condition"])
    prepared, reporter, _ = condot_run(tmp_path, adata, steps, data, **solver)
    final = final_mmd(reporter, "A+B")
    truth = prepared.cells(None, "A+B", "test")
    rows = evaluate_map(prepared.cells(None, "B", "train"), truth, truth, truth, knn=False, sinkhorn=False)
    only_b = next(r.value for r in rows if r.split == "test" and r.metric == "mmd")
    print("A+B mmd:", final, "B's cells:", only_b)
    assert final["test"] < min(final["test_identity"], final["test_gaussian"], final["test_observed"], only_b)


def test_cli_train_condot_with_a_held_out_dose_and_predict_any_dose(ray_session, tmp_path, capsys):
    """The CLI end to end on the local Ray: `train --solver condot --context-keys dose --embedding
    dose=log --holdout dose=1000` stores test rows for all four doses (the held-out one included) and
    `predict --context dose=3000` maps controls to a dose never seen in any form (its mean shift lies
    between those of 1000 and 10000; nearer 10000's, the nearest training context in log-dose, whose
    quadratic the softmax picks), with the source cells' obs and the run in uns; a context key with a per-map
    solver, a bad --context, or --context with --perturbations is exit 2."""
    import anndata as ad

    from engine.api import FitResult
    from engine.cli import main
    from engine.data import make_dose_response

    data = tmp_path / "dose.h5ad"
    adata = make_dose_response(n_cells=300)
    adata.write_h5ad(data)
    out = tmp_path / "run"
    base = ["train", "--data", str(data), "--condition-key", "dose", "--control", "0", "--context-keys", "dose",
            "--embedding", "dose=log", "--holdout", "dose=1000", "--steps", "10"]
    assert main(base + ["--solver", "condot", "--set", "solver.inner_steps=1", "--set", "solver.hidden=[8]",
                        "--out", str(out)]) == 0
    final = FitResult.load(out).summary("mmd").set_index("perturbation")
    assert sorted(final.index) == ["10", "100", "1000", "10000"]
    assert (final["model"] < final["identity"]).all()
    controls = tmp_path / "controls.h5ad"
    adata[adata.obs["dose"] == "0"][:200].write_h5ad(controls)
    shifts = {}
    for dose in ("1000", "3000", "10000"):
        capsys.readouterr()
        assert main(["predict", "--run", str(out), "--data", str(controls), "--context", f"dose={dose}",
                     "--out", str(tmp_path / f"p{dose}.h5ad")]) == 0
        predicted = ad.read_h5ad(tmp_path / f"p{dose}.h5ad")
        assert predicted.n_obs == 200 and set(predicted.obs["perturbation"]) == {dose}
        assert (predicted.obs["dose"] == "0").all() and predicted.uns["perturbot"]["solver"] == "condot"  # source obs
        shifts[dose] = np.linalg.norm(predicted.X.mean(0) - adata[adata.obs["dose"] == "0"][:200].X.mean(0))
    assert shifts["1000"] < shifts["3000"] <= shifts["10000"] + 1e-4
    for argv in (base + ["--solver", "cellot", "--out", str(tmp_path / "no")],
                 ["predict", "--run", str(out), "--data", str(controls), "--context", "donor=3",
                  "--out", str(tmp_path / "x.h5ad")],
                 ["predict", "--run", str(out), "--data", str(controls), "--context", "dose=3000",
                  "--perturbations", "10", "--out", str(tmp_path / "x.h5ad")]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("perturbot: error:"), err


# -- mode-of-action embedding ------------------------------------------------------------------------


def test_gaussian_w2_is_pots_bures_wasserstein_distance():
    """engine.ot.gaussian.gaussian_w2 equals POT's ot.gaussian.bures_wasserstein_distance pair by pair
    (1e-8 relative), is 0 on the diagonal (1e-6) and symmetric."""
    import ot

    from engine.ot.gaussian import gaussian_w2

    gen = torch.Generator().manual_seed(0)
    means = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    roots = torch.randn(4, 5, 5, generator=gen, dtype=torch.float64)
    covs = roots @ roots.transpose(-1, -2) + 0.1 * torch.eye(5, dtype=torch.float64)
    ours = gaussian_w2(means, covs, means, covs)
    for i in range(4):
        for j in range(4):
            theirs = float(ot.gaussian.bures_wasserstein_distance(means[i].numpy(), means[j].numpy(),
                                                                  covs[i].numpy(), covs[j].numpy()))
            assert abs(ours[i, j].item() - theirs) <= 1e-8 * max(1.0, theirs) + (1e-6 if i == j else 0)
    assert torch.allclose(ours, ours.T, atol=1e-9)


def test_smacof_recovers_a_euclidean_configuration_and_places_a_new_point():
    """Distances of 7 random points in 3-d: SMACOF in 3 dims reproduces every distance (1e-4, the
    stress near 0 from the classical start), the stress never increases over Guttman transforms, and a
    new point placed from its distances to the 7 (fixed) reproduces them (1e-4)."""
    from engine.data.moa import classical_mds, place, smacof, stress

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(8, 3))
    distances = np.linalg.norm(truth[:, None] - truth[None], axis=-1)
    seen = distances[:7, :7]
    points = smacof(seen, 3)
    np.testing.assert_allclose(np.linalg.norm(points[:, None] - points[None], axis=-1), seen, atol=1e-4)
    assert stress(points, seen) <= stress(classical_mds(seen, 3), seen) + 1e-12
    squeezed = smacof(seen, 1)  # 3-d distances in 1 dim: stress stays > 0 but below the start's
    assert 0 < stress(squeezed, seen) <= stress(classical_mds(seen, 1), seen)
    new = place(points, distances[7, :7])
    np.testing.assert_allclose(np.linalg.norm(new - points, axis=1), distances[7, :7], atol=1e-4)


def knockouts(n_cells: int = 300, dim: int = 5, seed: int = 0):
    """Five knockouts in twins of similar effect: KO1a, KO1b shift the controls along e1 (by 2, 2.3),
    KO2a, KO2b along e2 (2, 2.3), KO3 along e3 by 2; "KO1a+KO2a" by the sum of both shifts."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    eye = np.eye(dim)
    shifts = {"control": 0 * eye[0], "KO1a": 2 * eye[0], "KO1b": 2.3 * eye[0], "KO2a": 2 * eye[1],
              "KO2b": 2.3 * eye[1], "KO3": 2 * eye[2], "KO1a+KO2a": 2 * eye[0] + 2 * eye[1]}
    x = np.concatenate([s + rng.normal(size=(n_cells, dim)) for s in shifts.values()]).astype(np.float32)
    obs = pd.DataFrame({"condition": np.repeat(list(shifts), n_cells)}, index=[f"c{i}" for i in range(len(x))])
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"f{i}" for i in range(dim)]))


def test_moa_places_similar_effects_close_and_is_saved_with_the_prepared_data(tmp_path):
    """--embedding condition=moa with KO2b held out: 4 seen single knockouts give 3-d points (J - 1)
    scaled to a largest |coordinate| of 1; each knockout's nearest other knockout is its twin, the held-out KO2b (placed from
    its held-out cells) lands nearest KO2a, and the pair KO1a+KO2a is the sum of its parts' points;
    the points survive save/load (what predict reads). Errors: moa on the split-by key, a part seen
    only in combinations, a part not in the run."""
    from engine.data import DataError, DataSpec, PreparedData, prepare
    from engine.data.contexts import ContextEncoder, map_contexts

    adata = knockouts()
    spec = DataSpec("condition", "control", holdout=("condition", "KO2b"), context_keys=("condition",),
                    embeddings=("condition=moa",))
    prepared = prepare(adata, spec)
    names = [k.perturbation for k in prepared.maps]
    contexts = map_contexts(prepared, prepared.maps)
    point = dict(zip(names, contexts))
    singles = [n for n in names if "+" not in n]
    assert contexts.shape == (6, 3) and max(np.abs(point[n]).max() for n in singles if n != "KO2b") == pytest.approx(1)
    for name, twin in (("KO1a", "KO1b"), ("KO1b", "KO1a"), ("KO2a", "KO2b"), ("KO2b", "KO2a")):
        others = [n for n in singles if n != name]
        assert min(others, key=lambda n: np.linalg.norm(point[n] - point[name])) == twin, name
    np.testing.assert_allclose(point["KO1a+KO2a"], point["KO1a"] + point["KO2a"], atol=1e-6)
    loaded = PreparedData.load(prepared.save(tmp_path / "data"))
    assert loaded == prepared and np.array_equal(map_contexts(loaded, loaded.maps), contexts)
    with pytest.raises(DataError, match="only the condition key"):
        DataSpec("condition", "control", split_by="g", context_keys=("condition", "g"), embeddings=("g=moa",))
    pairs_only = adata[adata.obs["condition"].isin(["control", "KO1a", "KO1b", "KO1a+KO2a"])].copy()
    with pytest.raises(DataError, match="KO2a"):
        prepare(pairs_only, DataSpec("condition", "control", context_keys=("condition",), embeddings=("condition=moa",)))
    with pytest.raises(DataError, match="not a label"):
        loaded.contexts.encode({"condition": "KO9"})
    assert isinstance(loaded.contexts, ContextEncoder)


def test_condot_with_moa_contexts_trains_end_to_end(tmp_path):
    """CondOT on moa contexts (KO2b held out, 20 min-max steps through the worker's job): test rows
    for all six maps, and the held-out KO2b's prediction (its context next to KO2a's) beats identity
    by more than 3x."""
    data = dict(condition_key="condition", control="control", holdout=["condition", "KO2b"],
                context_keys=["condition"], embeddings=["condition=moa"])
    _, reporter, _ = condot_run(tmp_path, knockouts(), 20, data, inner_steps=2)
    final = final_mmd(reporter, "KO2b")
    print("KO2b mmd:", final)
    assert final["test"] < final["test_identity"] / 3
    assert {r["perturbation"] for r in reporter.rows if r["split"] == "test"} == {
        "KO1a", "KO1b", "KO2a", "KO2b", "KO3", "KO1a+KO2a"}


def test_several_held_out_values_are_each_an_unseen_context_evaluated_on_their_cells(tmp_path):
    """--holdout KEY=V1,V2: `dose=100,1000` leaves both doses without train or valid cells (all 100 of
    each are test cells) and the others trained; `condition=KO1b,KO2b` under moa places each held-out
    knockout from its own held-out cells (KO1b next to its twin KO1a, KO2b next to KO2a), and after
    20 min-max steps both get test rows, each prediction beating identity by more than 3x."""
    from engine.data import DataSpec, make_dose_response, prepare
    from engine.data.contexts import map_contexts

    doses = prepare(make_dose_response(n_cells=100), DataSpec("dose", "0", holdout=("dose", ("100", "1000")),
                                                             context_keys=("dose",), embeddings=("dose=log",)))
    assert {k.perturbation: doses.has_training_cells(k) for k in doses.maps} == {
        "10": True, "100": False, "1000": False, "10000": True}
    for dose in ("100", "1000"):
        assert len(doses.cells(None, dose, "test")) == 100 and len(doses.cells(None, dose, "valid")) == 0
    data = dict(condition_key="condition", control="control", holdout=["condition", ["KO1b", "KO2b"]],
                context_keys=["condition"], embeddings=["condition=moa"])
    prepared, reporter, _ = condot_run(tmp_path, knockouts(), 20, data, inner_steps=2)
    names = [k.perturbation for k in prepared.maps]
    point = dict(zip(names, map_contexts(prepared, prepared.maps)))
    singles = [n for n in names if "+" not in n]
    for name, twin in (("KO1b", "KO1a"), ("KO2b", "KO2a")):
        key = prepared.maps[names.index(name)]
        assert not prepared.has_training_cells(key) and len(prepared.cells(None, name, "test")) == 300
        assert min((n for n in singles if n != name), key=lambda n: np.linalg.norm(point[n] - point[name])) == twin
        final = final_mmd(reporter, name)
        print(name, "mmd:", final)
        assert set(final) == {"test", "test_identity", "test_observed", "test_mean_shift", "test_gaussian"}
        assert final["test"] < final["test_identity"] / 3


def test_per_knockout_cellot_sees_the_condot_runs_split_of_every_seen_knockout():
    """Per-context CellOT maps beside CondOT: the same data and seed without --holdout and context
    keys (every knockout its own map) split every (group, condition) the held-out run trains on, the
    control included, into exactly the same train / valid / test cells (splits are drawn per pair,
    seeded by the pair's labels); a held-out knockout is all test cells in the CondOT run and split
    70/10/20 in the CellOT run (which trains on 70% of it: an oracle there)."""
    from engine.data import DataSpec, prepare

    adata = knockouts()
    condot = prepare(adata, DataSpec("condition", "control", holdout=("condition", ("KO1b", "KO2b")),
                                     context_keys=("condition",), embeddings=("condition=moa",)))
    cellot = prepare(adata, DataSpec("condition", "control"))
    assert [k.perturbation for k in condot.maps] == [k.perturbation for k in cellot.maps]
    for condition in ["control", *(k.perturbation for k in condot.maps)]:
        held_out, own = ({s: run.cell_names(None, condition, s) for s in ("train", "valid", "test")}
                         for run in (condot, cellot))
        if condition in ("KO1b", "KO2b"):
            assert (len(held_out["train"]), len(held_out["valid"]), len(held_out["test"])) == (0, 0, 300)
            assert [len(own[s]) for s in ("train", "valid", "test")] == [210, 30, 60]
        else:
            assert held_out == own and len(own["valid"]) == 30, condition


# -- data-parallel training ---------------------------------------------------------------------------


class ThreadSum:
    """An all-reduce (in-place sum) between threads, for workers simulated in one process: every
    worker adds the parts in the same order, so all get the same sum."""

    def __init__(self, workers: int) -> None:
        import threading

        self.barrier = threading.Barrier(workers)
        self.parts: list[torch.Tensor | None] = [None] * workers

    def for_rank(self, rank: int):
        def all_reduce(tensor: torch.Tensor) -> None:
            self.parts[rank] = tensor.clone()
            self.barrier.wait()
            total = self.parts[0].clone()
            for part in self.parts[1:]:
                total += part
            self.barrier.wait()
            tensor.copy_(total)

        return all_reduce


def parallel_condot(share: tuple[int, int], all_reduce=None, combinator: str = "sum",
                    dtype: torch.dtype = torch.float32, steps: int = 30):
    """CondOT trained `steps` steps on worker `share` of a 4-context problem, in `dtype`: (logs [steps, 3], solver)."""
    from engine.solvers.optim import worker_average
    from engine.train.stack_data import batch_share

    sources, targets, contexts = gaussian_contexts(dim=3, n=400)
    data = StackData(sources, targets, sources, targets, seeds=[1, 2, 3, 4], batch_size=64, contexts=contexts,
                     share=share)
    for population in (data.source, data.target):  # StackData holds float32 cells; the float64 case casts them
        population.cells = population.cells.to(dtype)
    data.contexts = data.contexts.to(dtype)
    options = {"hidden": [16, 16], "inner_steps": 2, "lr": 1e-3, "contexts_per_step": 2, "combinator": combinator}
    solver = build_solver("condot", 4, 3, options, context_dim=1).to(dtype)
    solver.initialize(data, [7])
    if all_reduce is not None:
        solver.average = worker_average(batch_share(share, 64), all_reduce)
    plan = solver.plan(solver.config, steps)
    solver.start_training(plan)
    logs = [solver.train_step(data, step, plan.phases[0]) for step in range(steps)]
    return torch.stack([torch.cat([v.reshape(-1) for v in row.values()]) for row in logs]), solver


@pytest.mark.parametrize("combinator, dtype, tolerance", [("sum", torch.float32, 1e-4), ("deepset", torch.float64, 1e-9)])
def test_two_data_parallel_workers_follow_the_one_worker_loss_curve(combinator, dtype, tolerance):
    """Ray-free core of data parallelism: worker (r, 2) draws the slots r, r + 2, ... of every
    minibatch (disjoint; together exactly the one-worker minibatch of 64), and averaging gradients and
    logs over the two (threads here; torch.distributed in the Ray layer) reproduces one worker with
    the same global batch: 30 CondOT steps (2 contexts per step, lr 1e-3) log the same loss_g, loss_f
    and w2_estimate, and end at the same weights, within `tolerance` relative to the curve's scale
    (float32: 1e-4; measured ~1e-6, sums in another order). With the deep set we compare in float64
    (1e-9; measured 4e-11): in float32 its steep start (the softmax's beta is 2500 over these
    deep-set contexts) amplifies the rounding to 2e-3 on loss_g within 30 steps."""
    import threading

    halves = [StackData(*gaussian_contexts(dim=3, n=400)[:2] * 2, seeds=[1, 2, 3, 4], batch_size=64, share=(r, 2))
              for r in range(2)]
    whole = StackData(*gaussian_contexts(dim=3, n=400)[:2] * 2, seeds=[1, 2, 3, 4], batch_size=64)
    first, second, both = halves[0].source_batch(), halves[1].source_batch(), whole.source_batch()
    assert first.shape == (4, 32, 3) and torch.equal(torch.stack([first, second], 2).reshape(4, 64, 3), both)

    reference, alone = parallel_condot((0, 1), None, combinator, dtype)
    reduce = ThreadSum(2)
    results: dict[int, tuple] = {}

    def worker(rank: int) -> None:
        results[rank] = parallel_condot((rank, 2), reduce.for_rank(rank), combinator, dtype)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    scale = reference.abs().max().item()
    for rank in range(2):
        logs, solver = results[rank]
        assert (logs - reference).abs().max().item() <= tolerance * scale, rank
        for name, value in alone.state_dict().items():
            assert torch.allclose(solver.state_dict()[name], value, atol=tolerance * 10, rtol=tolerance), name
    assert torch.equal(results[0][0], results[1][0])
    assert (reference[1:] != reference[:-1]).any(), "a flat curve would not test much"


@pytest.mark.slow
def test_condot_on_two_ray_workers_logs_the_one_worker_loss_curve(ray_session, tmp_path):
    """Data-parallel CondOT through Ray Train (engine.fit, --workers 2 on the local Ray: shares of
    each minibatch, gradients all-reduced with torch.distributed/gloo) against the same run trained
    by the worker's job without Ray (one worker, the same global batch of 256): every logged
    loss_g, loss_f and w2_estimate (means over 10-step windows, 40 steps) and every validation mmd
    agree within 1e-4 relative to the curve's scale (float32 sums in another order), and the final
    test mmd of every map within 1e-3 relative; only rank 0 wrote rows (one row per map, step and metric)."""
    import engine
    from engine.data import make_dose_response

    adata = make_dose_response(n_cells=400, seed=0)
    data = dict(condition_key="dose", control="0", context_keys=["dose"], embeddings=["dose=log"])
    solver = {"hidden": [16, 16], "inner_steps": 2, "lr": 1e-3, "contexts_per_step": 2}
    _, reporter, _ = condot_run(tmp_path / "one", adata, 40, data, eval_every=10, **solver)
    result = engine.fit(adata, **data, solver="condot", steps=40, seed=0, workers=2, progress=False,
                        solver_params=solver, train={"eval_every": 10}, out=tmp_path / "two")
    rows = result.metrics()
    assert not rows.duplicated(["perturbation", "split", "metric", "step"]).any()
    one = {(r["perturbation"], r["split"], r["metric"], r["step"]): r["value"] for r in reporter.rows}
    two = {(r.perturbation, r.split, r.metric, r.step): r.value for r in rows.itertuples()}
    curves = [k for k in one if k[2] in ("loss_g", "loss_f", "w2_estimate") or k[1] == "valid"]
    assert len(curves) == 3 * 4 * 4 + 4 * 5 and set(curves) <= set(two)  # losses at steps 10..40, mmd at 0..40
    scale = max(abs(one[k]) for k in curves)
    gaps = {k: abs(one[k] - two[k]) for k in curves}
    print("largest gap / scale:", max(gaps.values()) / scale)
    assert max(gaps.values()) <= 1e-4 * scale, max(gaps.items(), key=lambda item: item[1])
    assert max(gaps.values()) > 0, "identical curves: one worker trained the whole batch alone"
    for key in (k for k in one if k[1] == "test" and k[2] == "mmd"):
        assert abs(one[key] - two[key]) <= 1e-3 * abs(one[key]), key


@pytest.mark.slow
def test_a_stopped_data_parallel_run_resumes_from_its_checkpoint_on_every_worker(ray_session, tmp_path):
    """Data-parallel resume on the local Ray: a 2-worker CondOT run (dose response, dose 1000 held
    out, 300 steps, a checkpoint every 20) is stopped (Ctrl-C) once its first checkpoint exists and
    finished by resume_run. It resumed mid-run (resumed_from in (0, 300)), every context has exactly
    one final row set (the held-out dose included), the maps are trained with all 300 steps, and
    every logged loss, validation mmd and final metric equals that of the same 2-worker run never
    stopped (1e-6 of each curve's scale; measured: identical), so both workers resumed the same state
    at the same step. (Not against one worker: with these three training contexts, float32 rounding
    differences between 1 and 2 workers grow ~2.5x per step through Adam, to 3e-3 of the curve's scale
    in 20 steps; in float64 the two agree to 5e-12.)"""
    import engine
    from engine.api import resume_run
    from engine.data import make_dose_response

    steps, adata = 300, make_dose_response(n_cells=300, seed=0)
    options = dict(condition_key="dose", control="0", holdout=["dose", "1000"], context_keys=["dose"],
                   embeddings=["dose=log"], solver="condot", steps=steps, seed=0, workers=2,
                   solver_params={"hidden": [16, 16], "inner_steps": 2, "lr": 1e-3, "contexts_per_step": 2},
                   train={"eval_every": 20, "checkpoint_every": 20})
    out = tmp_path / "stopped"

    def ctrl_c(progress) -> None:
        if any((out / "checkpoints").glob("*.train.pt")):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.fit(adata, **options, out=out, on_progress=ctrl_c)
    rows = resume_run(out, on_progress=lambda progress: None).metrics()
    resumed = rows[rows["metric"] == "resumed_from"]
    print("resumed from", sorted(set(resumed["value"])))
    assert len(resumed) == 3 and set(resumed["perturbation"]) == {"10", "100", "10000"}  # the trained contexts
    assert resumed["value"].nunique() == 1 and 0 < resumed["value"].iloc[0] < steps
    assert not rows.duplicated(["perturbation", "split", "metric", "step"]).any()
    final = rows[rows["split"].str.startswith("test")]
    assert (final.groupby(["perturbation", "split", "metric"]).size() == 1).all()
    assert sorted(final["perturbation"].unique()) == ["10", "100", "1000", "10000"]
    assert final.groupby("perturbation").size().nunique() == 1
    result = engine.FitResult.load(out)
    assert (result.maps()["status"] == "trained").all() and (result.maps()["steps"] == steps).all()

    never = engine.fit(adata, **options, out=tmp_path / "never", progress=False).metrics()
    values = {name: {(r.perturbation, r.split, r.metric, r.step): r.value for r in table.itertuples()
                     if r.metric not in ("train_seconds", "resumed_from") and r.value == r.value}  # NaN: knn, few cells
              for name, table in (("stopped", rows), ("never", never))}
    assert values["stopped"].keys() == values["never"].keys()
    gaps = {}
    for metric in {k[2] for k in values["never"]}:
        keys = [k for k in values["never"] if k[2] == metric]
        scale = max(abs(values["never"][k]) for k in keys) or 1.0
        gaps[metric] = max(abs(values["stopped"][k] - values["never"][k]) for k in keys) / scale
    print("largest gap / scale per metric:", max(gaps.values()), gaps)
    assert max(gaps.values()) <= 1e-6
    after = [k for k in values["never"] if k[2] == "loss_g" and k[3] > resumed["value"].iloc[0]]
    assert after, "the curve after the resume is compared"


def test_a_failing_data_parallel_worker_raises_instead_of_leaving_the_others_waiting(tmp_path, monkeypatch):
    """A stack that fails is reported `failed` with its error; one worker goes on to its other stacks,
    but a data-parallel worker (an Average set) raises, since the others would wait for it in the
    all-reduce (Ray Train then restarts the group)."""
    from engine.config import RunConfig
    from engine.data import make_dose_response, prepare
    from engine.rundir import RunDir
    from engine.train import worker

    def broken(*args):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(worker, "_train_one_stack", broken)
    config = RunConfig.resolve(dataset="x", solver="condot", condition_key="dose", control="0", steps=1,
                               context_keys=["dose"])
    prepared = prepare(make_dose_response(n_cells=60), config.data)
    for average in (None, lambda tensors: None):
        reporter = Collect()
        run = worker.MapRun(prepared, config, RunDir(tmp_path / "run"), reporter, torch.device("cpu"), "r",
                            (0, 2) if average else (0, 1), average)
        if average is None:
            worker.train_maps(run, prepared.maps)
        else:
            with pytest.raises(RuntimeError, match="out of memory"):
                worker.train_maps(run, prepared.maps)
        assert {r["status"] for r in reporter.map_rows} == {"failed"}
        assert all("out of memory" in r["error"] for r in reporter.map_rows)
