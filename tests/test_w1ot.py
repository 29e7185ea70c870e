"""W1OT (engine.solvers.w1ot) and its 1-Lipschitz layers (engine.nn.lipschitz).

Mathematical properties with explicit tolerances (STYLE.md):
- orthonormal layers have singular values 1 (Cayley and Björck, square and semi-orthogonal);
- the potential is 1-Lipschitz on random pairs (1 + 1e-4), before and after training;
- its dual value approaches POT's exact W1 (Euclidean cost) on small 2-D samples (5%);
- stacked training equals training each map alone (float64 free runs, both phases);
- a checkpoint taken inside the cosine-annealed potential phase resumes to the straight run;
- through the CLI with default settings (slow), the "bookshelf" toy of the paper keeps the order of the
  points (Spearman >= 0.99), and its concentric circles map inner ring to inner ring (95%).
Contract properties (save/load, divergence, selection) come from tests/test_solver_contract.py.
"""
from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import ot
import pandas as pd
import pytest
import torch

from engine.options import DataError
from engine.nn.lipschitz import LipschitzPotential, OrthonormalLinear, group_sort
from engine.solvers import build_solver
from engine.solvers.base import StackSolver
from engine.solvers.w1ot import W1OT
from engine.train.loop import TrainConfig, train_stack
from engine.train.stack_data import StackData, map_seed

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ["cayley", "bjorck"]
NEVER = 10**9


def gaussian_maps(n_maps: int, dim: int, seed: int = 0, sizes=(150, 210, 120)):
    """Per-map (source, target, valid_source, valid_target) lists: Gaussians with their own shifts."""
    rng = np.random.default_rng(seed)
    out: tuple[list, list, list, list] = ([], [], [], [])
    for k in range(n_maps):
        n = sizes[k % len(sizes)]
        shift, scale = rng.normal(size=dim) + 2.0, rng.uniform(0.5, 1.5, size=dim)
        for i, (count, target) in enumerate(((n, False), (n + 13, True), (60, False), (50, True))):
            cells = rng.normal(size=(count, dim))
            out[i].append((cells * scale + shift if target else cells).astype(np.float32))
    return out


def make(arrays, maps, seeds, batch_size: int = 64, **params) -> tuple[StackData, StackSolver]:
    data = StackData(*(tuple([a[k] for k in maps] for a in arrays)), seeds=[seeds[k] for k in maps],
                     batch_size=batch_size)
    solver = build_solver("w1ot", len(maps), data.dim, params)
    solver.initialize(data, [seeds[k] for k in maps])
    return data, solver


def train_by_hand(solver: StackSolver, data: StackData, steps: int) -> None:
    plan = solver.plan(solver.config, steps)
    solver.start_training(plan)
    for step in range(plan.total):
        solver.train_step(data, step, plan.phase_at(step))


def lipschitz_ratios(f: LipschitzPotential, n_maps: int, dim: int, seed: int = 0) -> torch.Tensor:
    """|f(x) - f(y)| / ||x - y|| [K, n] on random pairs, far apart and close together (float64)."""
    g = torch.Generator().manual_seed(seed)
    x = 3.0 * torch.randn(n_maps, 400, dim, generator=g, dtype=torch.float64)
    step = torch.randn(n_maps, 400, dim, generator=g, dtype=torch.float64)
    step[:, 200:] *= 1e-3  # half the pairs close together
    y = x + step
    with torch.no_grad():
        return (f(x) - f(y)).abs().squeeze(-1) / step.norm(dim=-1)


# -- layers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(3, 64), (64, 64), (64, 1), (300, 64)])
def test_orthonormal_weights(method, shape):
    """Every map's weight [in, out] has all singular values 1 (1e-5): orthonormal columns for
    in >= out, orthonormal rows for in < out."""
    layer = OrthonormalLinear(2, *shape, method=method)
    for k in range(2):
        layer.init_map(k, torch.Generator().manual_seed(k))
    weight = layer.weight()
    assert weight.shape == (2, *shape)
    torch.testing.assert_close(torch.linalg.svdvals(weight.double()), torch.ones(2, min(shape), dtype=torch.float64),
                               rtol=0, atol=1e-5)


def test_group_sort_sorts_each_group():
    x = torch.tensor([[[3.0, 1.0, 2.0, 0.0, -1.0, 5.0, 4.0, 2.0]]])
    expected = torch.tensor([[[0.0, 1.0, 2.0, 3.0, -1.0, 2.0, 4.0, 5.0]]])
    torch.testing.assert_close(group_sort(x, 2), expected)
    torch.testing.assert_close(group_sort(x, 8), x)


# -- the potential -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_potential_is_1_lipschitz_before_and_after_training(method):
    """|f(x) - f(y)| / ||x - y|| <= 1 + 1e-4 on random pairs for K=2 maps (default widths, d = 5),
    at init and after 40 potential steps at lr 1e-2 (which move the weights)."""
    arrays = gaussian_maps(2, 5)
    seeds = [map_seed(0, "a"), map_seed(0, "b")]
    data, solver = make(arrays, [0, 1], seeds, orthonormal=method, potential_fraction=1.0)
    start = solver.snapshot()
    for trained in (False, True):
        if trained:
            train_by_hand(solver, data, 40)
        ratios = lipschitz_ratios(solver.f.double(), 2, 5)
        solver.float()
        assert ratios.max().item() <= 1 + 1e-4
        if trained:  # the trained potential is steep along the transport (gradient norm near 1)
            assert ratios.max().item() > 0.8
    moved = max((solver.snapshot()[n] - start[n]).abs().max().item() for n in start if n.startswith("f."))
    assert moved > 1e-2


def test_w1_estimate_matches_exact_w1():
    """After 300 potential steps, mean f(x) - mean f(y) on two 200-point 2-D samples (a Gaussian and
    a two-component mixture) lies within 5% of their exact W1 (ot.emd2, Euclidean cost); it is a
    lower bound up to rounding (f is 1-Lipschitz), and the logged w1_estimate agrees with it."""
    rng = np.random.default_rng(0)
    n = 200
    x = rng.normal(size=(n, 2)).astype(np.float32)
    centers = np.where(rng.random((n, 1)) < 0.5, [-2.0, 1.0], [2.0, 1.0])
    y = (0.3 * rng.normal(size=(n, 2)) + centers).astype(np.float32)
    uniform = np.full(n, 1.0 / n)
    exact = ot.emd2(uniform, uniform, ot.dist(x.astype(np.float64), y.astype(np.float64), metric="euclidean"))
    data = StackData([x], [y], [x], [y], seeds=[1], batch_size=256)
    solver = build_solver("w1ot", 1, 2, {"potential_fraction": 1.0})
    solver.initialize(data, [1])
    plan = solver.plan(solver.config, 300)
    solver.start_training(plan)
    for step in range(plan.total):
        logs = solver.train_step(data, step, plan.phase_at(step))
    with torch.no_grad():
        estimate = (solver.f(torch.from_numpy(x)[None]).mean() - solver.f(torch.from_numpy(y)[None]).mean()).item()
    assert abs(estimate - exact) <= 0.05 * exact
    assert estimate <= exact * (1 + 1e-5)
    assert logs["w1_estimate"].shape == (1,)
    assert abs(logs["w1_estimate"].item() - estimate) <= 0.1 * exact  # a minibatch estimate of the same


# -- the solver --------------------------------------------------------------------------------------


def test_plan_splits_the_steps_and_only_the_step_size_selects():
    plan = W1OT.plan(W1OT.Config(), 20_000)
    assert plan.describe() == [("potential", 10_000, False), ("step_size", 10_000, True)]
    assert W1OT.published_steps == 20_000
    assert W1OT.plan(W1OT.Config(potential_fraction=0.3), 7).describe() == [("potential", 2, False),
                                                                           ("step_size", 5, True)]
    with pytest.raises(DataError, match="potential_fraction"):  # a bad option is an exit-2 input error
        build_solver("w1ot", 1, 2, {"potential_fraction": 1.5})
    with pytest.raises(DataError, match="GroupSort"):
        build_solver("w1ot", 1, 2, {"hidden": [30, 30]})


def test_schedule_anneals_the_potential_lr():
    """The potential's lr follows the cosine from 1e-2 to 1e-4 over its phase; eta and D stay at 1e-4;
    and the step-size phase moves eta and D only (f is fixed)."""
    arrays = gaussian_maps(1, 3)
    data, solver = make(arrays, [0], [map_seed(0, "a")], hidden=[16, 16], step_hidden=[16, 16])
    plan = solver.plan(solver.config, 20)
    solver.start_training(plan)
    lrs = []
    for step in range(10):
        lrs.append(solver.optimizers["potential"].param_groups[0]["lr"])
        solver.train_step(data, step, plan.phase_at(step))
    assert lrs[0] == pytest.approx(1e-2) and lrs[5] == pytest.approx((1e-2 + 1e-4) / 2)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert solver.optimizers["potential"].param_groups[0]["lr"] == pytest.approx(1e-4)
    before = solver.snapshot()
    for step in range(10, 20):
        solver.train_step(data, step, plan.phase_at(step))
    after = solver.snapshot()
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith("f."))
    for net in ("eta.", "discriminator."):
        assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith(net))
    assert solver.optimizers["eta"].param_groups[0]["lr"] == pytest.approx(1e-4)


def test_transport_moves_along_the_normalised_gradient():
    """T(x) - x = -eta(x) grad f(x) / ||grad f(x)||: its length is eta(x) (>= 0) and it is parallel
    to -grad f(x), the direction used in training."""
    arrays = gaussian_maps(2, 4)
    seeds = [map_seed(0, "a"), map_seed(0, "b")]
    data, solver = make(arrays, [0, 1], seeds)
    train_by_hand(solver, data, 10)
    x = torch.randn(2, 30, 4, generator=torch.Generator().manual_seed(0))
    step = solver.transport(x).cells - x
    with torch.no_grad():
        eta = solver.eta(x)
    torch.testing.assert_close(step.norm(dim=-1, keepdim=True), eta, rtol=1e-5, atol=1e-6)
    x_grad = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(solver.f(x_grad).sum(), x_grad)
    cosine = torch.nn.functional.cosine_similarity(step, -grad, dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_stacked_equals_one_at_a_time_float64(method):
    """K=3 maps (default widths) trained 30 steps (15 potential + 15 step size) as one stack end
    equal (1e-6) to each map trained alone with the same seed and data, in float64 (BLAS rounds a
    K=1 and a K=3 bmm differently; float64 keeps that below the tolerance)."""
    arrays = gaussian_maps(3, 5)
    seeds = [map_seed(0, name) for name in ("drug_a", "drug_b", "drug_c")]

    def run(maps: list[int]) -> dict[str, torch.Tensor]:
        data, solver = make(arrays, maps, seeds, orthonormal=method)
        for population in (data.source, data.target):
            population.cells = population.cells.double()
        solver.double()
        train_by_hand(solver, data, 30)
        return solver.snapshot()

    stacked = run([0, 1, 2])
    for k in range(3):
        alone = run([k])
        for name, value in stacked.items():
            torch.testing.assert_close(value[k], alone[name][0], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_checkpoint_resume_inside_the_potential_phase(tmp_path: Path):
    """30 straight steps == a run stopped after step 8 (inside the potential phase, its lr partly
    annealed) + a fresh solver and StackData resumed to 30: weights, Adam and scheduler state,
    best steps and MMDs, draws."""
    arrays = gaussian_maps(2, 4)
    seeds = [map_seed(4, "p"), map_seed(4, "q")]
    params = {"hidden": [16, 16], "step_hidden": [16, 16]}
    config = TrainConfig(steps=30, eval_every=5, checkpoint_every=8)
    straight_data, straight = make(arrays, [0, 1], seeds, **params)
    straight_outcome = train_stack(straight, straight_data, config)

    class Interrupted(Exception):
        pass

    def stop_at_8(done: int) -> None:
        if done == 8:
            raise Interrupted

    path = tmp_path / "stack.pt"
    data, first = make(arrays, [0, 1], seeds, **params)
    with pytest.raises(Interrupted):
        train_stack(first, data, config, checkpoint=path, on_progress=stop_at_8)
    plan = W1OT.plan(first.config, 30)
    assert plan.phase_at(7).name == "potential" and plan.phase_at(8).name == "potential"
    assert first.schedulers["potential"].get_last_lr()[0] < first.config.lr
    data, resumed = make(arrays, [0, 1], seeds, **params)
    outcome = train_stack(resumed, data, config, checkpoint=path)
    assert data.draws == straight_data.draws
    a, b = straight.snapshot(), resumed.snapshot()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for name, opt in straight.optimizers.items():
        for p, q in zip(opt.param_groups[0]["params"], resumed.optimizers[name].param_groups[0]["params"]):
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt.state[p][key], resumed.optimizers[name].state[q][key], rtol=0, atol=1e-6)
    assert resumed.schedulers["potential"].get_last_lr() == straight.schedulers["potential"].get_last_lr()
    assert outcome.best_step == straight_outcome.best_step
    assert min(outcome.best_step) >= plan.phases[0].steps  # only the step-size phase selects
    assert outcome.best_mmd == pytest.approx(straight_outcome.best_mmd, rel=1e-6)


def _toys(n: int = 400, seed: int = 0) -> ad.AnnData:
    """The paper's two toys as one dataset, a group each (control -> "moved"), 2-D:
    "shelf": x1 uniform on [0, 1] -> [2, 3], x2 ~ N(0, 1e-3) in both;
    "rings": rings of radius 1 and 2 (n each) -> 2.5 and 4 (noise 0.02)."""
    rng = np.random.default_rng(seed)

    def shelf(low: float) -> np.ndarray:
        return np.stack([rng.uniform(low, low + 1, 2 * n), rng.normal(0, np.sqrt(1e-3), 2 * n)], 1)

    def rings(inner: float, outer: float) -> np.ndarray:
        radius = np.repeat([inner, outer], n)
        angle = rng.uniform(0, 2 * np.pi, 2 * n)
        return radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1) + 0.02 * rng.normal(size=(2 * n, 2))

    parts = [("shelf", "control", shelf(0.0)), ("shelf", "moved", shelf(2.0)),
             ("rings", "control", rings(1.0, 2.0)), ("rings", "moved", rings(2.5, 4.0))]
    obs = pd.DataFrame([(g, c) for g, c, x in parts for _ in x], columns=["toy", "condition"])
    obs.index = [f"{g}-{c}-{i}" for g, c, x in parts for i in range(len(x))]
    return ad.AnnData(X=np.concatenate([x for *_, x in parts]).astype(np.float32), obs=obs)


@pytest.mark.slow  # 2000 steps through Ray: about a minute
def test_toys_through_the_cli_with_default_settings(ray_session, tmp_path: Path):
    """The paper's toys, trained by `perturbot train --solver w1ot` with every default (2000 steps: 1000
    potential, 1000 step size), then every source cell predicted by `perturbot predict`:
    - bookshelf: the images keep the x1-order of the source points (Spearman >= 0.99) and land on
      the target shelf (mean x1 within 0.3 of 2.5);
    - circles: >= 95% of the inner ring's images lie nearer the inner target ring (r 2.5) than the
      outer one (r 4), and >= 95% of the outer ring's nearer the outer one."""
    from engine.cli import main

    toys = _toys()
    toys.write_h5ad(tmp_path / "toys.h5ad")
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "toys.h5ad"), "--condition-key", "condition",
                 "--control", "control", "--split-by", "toy", "--solver", "w1ot", "--out", str(run)]) == 0
    images = {}
    for toy in ("shelf", "rings"):
        controls = toys[(toys.obs["toy"] == toy) & (toys.obs["condition"] == "control")]
        controls.write_h5ad(tmp_path / f"{toy}.h5ad")
        assert main(["predict", "--run", str(run), "--data", str(tmp_path / f"{toy}.h5ad"),
                     "--perturbations", f"{toy}/moved", "--out", str(tmp_path / f"{toy}-moved.h5ad")]) == 0
        predicted = ad.read_h5ad(tmp_path / f"{toy}-moved.h5ad")
        assert list(predicted.obs["source_cell"]) == list(controls.obs_names)
        images[toy] = (np.asarray(controls.X), np.asarray(predicted.X))
    x, moved = images["shelf"]
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731 (Spearman = Pearson of the ranks; no ties here)
    assert np.corrcoef(ranks(x[:, 0]), ranks(moved[:, 0]))[0, 1] >= 0.99
    assert abs(moved[:, 0].mean() - 2.5) <= 0.3
    x, moved = images["rings"]
    inner = np.linalg.norm(x, axis=1) < 1.5
    radius = np.linalg.norm(moved, axis=1)
    nearer_inner = np.abs(radius - 2.5) < np.abs(radius - 4.0)
    assert nearer_inner[inner].mean() >= 0.95
    assert (~nearer_inner[~inner]).mean() >= 0.95
