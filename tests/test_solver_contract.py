"""The solver contract (engine.solvers.base), checked on every registered trainable solver.

A solver that registers in engine.solvers.SOLVERS gets every contract test here (parametrized over
TRAINABLE, plus the toy solvers of this file, registered for the test session only):
- stacked training equals training each map alone (float64, 1e-5);
- a checkpointed run resumed in the middle of a phase equals an uninterrupted one;
- restore_maps / blend change exactly the units a mask selects;
- transport gives cells [K, n, d] and weights None or [K, n], each map's from its own cells only;
- save_maps / SavedMaps / predict_cells reproduce the live solver;
- a diverging map (or a shared model) is frozen at its best state, the others carry on;
- each unit ends at its best state from a selecting phase.
Then the loop features of the contract, on the toys: phases, contexts, shared models; and import
hygiene (the training core imports without Ray, and engine/ has no import cycle).

Small data (d = 4, 3 maps of ~100 cells), few steps and 1 torch thread keep the file fast.
"""
from __future__ import annotations

import ast
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from engine.data import MapKey
from engine.metrics.evaluate import evaluate_map
from engine.solvers import SOLVERS, build_solver
from engine.solvers.base import Phase, Plan, StackSolver, Transport, make_config
from engine.train.checkpoint import load_checkpoint
from engine.train.evaluation import evaluate_maps
from engine.train.loop import StackOutcome, TrainConfig, evaluation_steps, train_stack, validation_mmd
from engine.train.saved_maps import SavedMaps, predict_cells, save_maps
from engine.train.stack_data import StackData, map_seed

REPO = Path(__file__).resolve().parents[1]
NEVER = 10**9  # eval_every / checkpoint_every that never fires inside a test run
CPU = torch.device("cpu")

TRAINABLE = sorted(n for n, c in SOLVERS.items() if c.trainable)
# Options that make a registered solver fast enough here; a solver not listed runs with its defaults.
FAST: dict[str, dict[str, Any]] = {"cellot": {"inner_steps": 2, "hidden": [16, 16]},
                                   "condot": {"inner_steps": 1, "hidden": [8, 8]},
                                   "w1ot": {"hidden": [16, 16], "step_hidden": [16, 16]},
                                   "nubot": {"hidden": [16, 16], "weight_hidden": [16]}}


pytestmark = pytest.mark.usefixtures("one_thread")


# -- toy solvers -------------------------------------------------------------------------------------


def moment_gap(moved: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-map squared distance between the batch means and variances [K] of moved [K, b, d] and y."""
    return ((moved.mean(1) - y.mean(1)) ** 2).sum(-1) + ((moved.var(1) - y.var(1)) ** 2).sum(-1)


@dataclass
class TwoPhaseConfig:
    warm_lr: float = 0.05
    lr: float = 0.05
    lr_step: int = 2  # StepLR period (steps of the "fit" phase)
    lr_decay: float = 0.5


class TwoPhase(StackSolver):
    """Toy stacked affine map T(x) = x A + b + w: a non-selecting warmup fits the scalar w, then A, b
    are fitted with a step-decayed learning rate (per-map moment matching)."""

    name = "toy_two_phase"
    Config = TwoPhaseConfig

    def __init__(self, n_maps: int, dim: int, config: TwoPhaseConfig, context_dim: int = 0) -> None:
        super().__init__(n_maps, dim, config, context_dim)
        self.matrix = nn.Parameter(torch.eye(dim).repeat(n_maps, 1, 1))  # [K, d, d]
        self.shift = nn.Parameter(torch.zeros(n_maps, 1, dim))  # [K, 1, d]
        self.warm = nn.Parameter(torch.zeros(n_maps, 1, 1))  # [K, 1, 1], trained in the warmup

    @torch.no_grad()
    def init_map(self, k: int, generator: torch.Generator) -> None:
        self.matrix[k] += 0.1 * torch.randn(self.dim, self.dim, generator=generator)
        self.shift[k] = 0.1 * torch.randn(1, self.dim, generator=generator)

    @classmethod
    def plan(cls, config: TwoPhaseConfig, steps: int) -> Plan:
        return Plan((Phase("warmup", steps // 2, selects_best=False), Phase("fit", steps - steps // 2)))

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"warm": torch.optim.Adam([self.warm], lr=self.config.warm_lr),
                "fit": torch.optim.Adam([self.matrix, self.shift], lr=self.config.lr)}

    def build_schedulers(self, plan: Plan) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
        c = self.config
        return {"fit": torch.optim.lr_scheduler.StepLR(self.optimizers["fit"], c.lr_step, c.lr_decay)}

    def train_step(self, data: StackData, step: int, phase: Phase) -> dict[str, torch.Tensor]:
        loss = moment_gap(self.transport(data.source_batch()).cells, data.target_batch())
        self.zero_grad(set_to_none=True)
        loss.sum().backward()  # maps share no parameter: the sum keeps them independent
        self.optimizers["warm" if phase.name == "warmup" else "fit"].step()
        if phase.name == "fit":
            self.schedulers["fit"].step()
        return {"loss": loss.detach()}

    def transport(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Transport:
        return Transport(torch.baddbmm(self.shift + self.warm, x, self.matrix))


@dataclass
class SharedContextConfig:
    hidden: int = 8
    lr: float = 0.02


class SharedContext(StackSolver):
    """Toy shared model T(x, c) = exp(s) x + MLP(c): one network (no map axis) over all contexts; it
    records the contexts that transport receives."""

    name = "toy_shared"
    Config = SharedContextConfig
    shared = True

    def __init__(self, n_maps: int, dim: int, config: SharedContextConfig, context_dim: int = 0) -> None:
        super().__init__(n_maps, dim, config, context_dim)
        if context_dim < 1:
            raise ValueError("toy_shared needs contexts (context_dim >= 1)")
        self.net = nn.Sequential(nn.Linear(context_dim, config.hidden), nn.Tanh(), nn.Linear(config.hidden, dim))
        self.log_scale = nn.Parameter(torch.zeros(()))  # a 0-dim parameter: no map axis at all
        self.seen: list[torch.Tensor] = []

    @torch.no_grad()
    def init_map(self, k: int, generator: torch.Generator) -> None:
        assert k == 0, "a shared model is one unit"
        for p in self.net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"model": torch.optim.Adam(self.parameters(), lr=self.config.lr)}

    def _move(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [K, n, d] with a context per cell [K, n, c]."""
        return self.log_scale.exp() * x + self.net(context)

    def train_step(self, data: StackData, step: int, phase: Phase) -> dict[str, torch.Tensor]:
        source, target = data.source_sample(), data.target_sample()
        gap = moment_gap(self._move(source.cells, source.context), target.cells)  # [K]
        loss = gap.mean()
        self.optimizers["model"].zero_grad(set_to_none=True)
        loss.backward()
        self.optimizers["model"].step()
        return {"loss": loss.detach().reshape(1), "gap": gap.detach()}  # a [1] and a [K] log

    def transport(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Transport:
        if context is None:
            raise ValueError("toy_shared needs a context per map")
        self.seen.append(context.detach().clone())
        return Transport(self._move(x, context.unsqueeze(1).expand(-1, x.shape[1], -1)))


@dataclass
class ScriptedConfig:
    script: str = "inside"  # inside | start (see Scripted.error_after)


class Scripted(StackSolver):
    """Toy whose state follows a script: T(x) = x + (1 - e) g, g the training mean shift, e set after
    each step from the step count alone (no optimizer), so the loop's best-state rules can be checked
    against known validation MMDs. Plan: warmup (non-selecting, half the steps), then fit."""

    name = "toy_scripted"
    Config = ScriptedConfig

    def __init__(self, n_maps: int, dim: int, config: ScriptedConfig, context_dim: int = 0) -> None:
        super().__init__(n_maps, dim, config, context_dim)
        self.register_buffer("goal", torch.zeros(n_maps, 1, dim))
        self.register_buffer("error", torch.ones(n_maps, 1, 1))
        self.warmup_end = 0

    plan = TwoPhase.plan

    def start_training(self, plan: Plan) -> None:
        super().start_training(plan)
        self.warmup_end = plan.phases[0].steps

    @torch.no_grad()
    def init_from_data(self, data: StackData) -> None:
        mean_s, _, mean_t, _ = data.moments(0.0)
        self.goal.copy_((mean_t - mean_s).float().unsqueeze(1))

    def error_after(self, done: int) -> float:
        """inside: exact at step 2 (inside the warmup), 0.3 at best in the fit (at W + 3);
        start: the warmup improves to exact at its end W, the fit only gets worse."""
        w = self.warmup_end
        if self.config.script == "inside":
            return (0.0 if done == 2 else 1.0) if done <= w else 0.3 + 0.3 * abs(done - (w + 3))
        return 1.0 - done / w if done <= w else 0.3 * (done - w)

    @torch.no_grad()
    def train_step(self, data: StackData, step: int, phase: Phase) -> dict[str, torch.Tensor]:
        self.error.fill_(self.error_after(step + 1))
        return {"error": self.error.reshape(-1).clone()}

    def transport(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Transport:
        return Transport(x + (1 - self.error) * self.goal)


TOYS = (TwoPhase, SharedContext, Scripted)
CONTRACT = TRAINABLE + [TwoPhase.name, SharedContext.name]


@pytest.fixture(autouse=True)
def toy_solvers(monkeypatch):
    """The toys are registered for each test only, so build_solver and SavedMaps find them."""
    for cls in TOYS:
        monkeypatch.setitem(SOLVERS, cls.name, cls)


# -- data and helpers --------------------------------------------------------------------------------

DIM = 4
SEEDS = [map_seed(0, f"map{k}") for k in range(3)]
CONTEXTS = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 1]], np.float32)  # one per map (a multi-hot)


def toy_arrays(n_maps: int = 3, dim: int = DIM, seed: int = 0, sizes=(100, 130, 80)):
    """Per-map Gaussians with their own means, covariances and cell counts:
    (source, target, valid_source, valid_target), lists of float32 [n, d]."""
    rng = np.random.default_rng(seed)
    out: tuple[list, list, list, list] = ([], [], [], [])
    for k in range(n_maps):
        n = sizes[k % len(sizes)]
        m_s, m_t = rng.normal(size=dim), rng.normal(size=dim) + 1.5
        a_s, a_t = rng.normal(size=(dim, dim)) * 0.4 + np.eye(dim), rng.normal(size=(dim, dim)) * 0.4 + np.eye(dim)
        for i, (mean, a, count) in enumerate(((m_s, a_s, n), (m_t, a_t, n + 17), (m_s, a_s, 60 + 7 * k), (m_t, a_t, 50 + 5 * k))):
            out[i].append((mean + rng.normal(size=(count, dim)) @ a).astype(np.float32))
    return out


ARRAYS = toy_arrays()


def make_data(maps=(0, 1, 2), batch_size: int = 32) -> StackData:
    maps = list(maps)
    return StackData(*(tuple([a[k] for k in maps] for a in ARRAYS)), seeds=[SEEDS[k] for k in maps],
                     batch_size=batch_size, contexts=CONTEXTS[maps])


def to_double(data: StackData) -> None:
    """Cast every float tensor of the stack's data to float64 (in place)."""
    for population in (data.source, data.target):
        population.cells = population.cells.double()
        if population.context is not None:
            population.context = population.context.double()
    for padded in (data.valid_source, data.valid_target):
        padded.cells, padded.weights = padded.cells.double(), padded.weights.double()
    if data.contexts is not None:
        data.contexts = data.contexts.double()


def make_solver(name: str, data: StackData, maps=(0, 1, 2), **params) -> StackSolver:
    context_dim = 0 if data.contexts is None else data.contexts.shape[1]
    solver = build_solver(name, data.n_maps, data.dim, {**FAST.get(name, {}), **params}, context_dim)
    solver.initialize(data, [SEEDS[k] for k in maps])
    return solver


def fresh(name: str, maps=(0, 1, 2), double: bool = False, **params) -> tuple[StackData, StackSolver]:
    data = make_data(maps)
    if double:
        to_double(data)
    solver = make_solver(name, data, maps, **params)
    return data, solver.double() if double else solver


def train_by_hand(solver: StackSolver, data: StackData, steps: int) -> None:
    """A few training steps outside train_stack (to move a solver away from its initial state)."""
    plan = solver.plan(solver.config, steps)
    solver.start_training(plan)
    for step in range(plan.total):
        solver.train_step(data, step, plan.phase_at(step))


def unit_of(solver: StackSolver, tensor: torch.Tensor, k: int) -> torch.Tensor:
    """Unit k of a state tensor: map k of a stacked solver, the whole tensor of a shared one."""
    return tensor if solver.shared else tensor[k]


def assert_unit_close(solver: StackSolver, a: dict, k_a: int, b: dict, k_b: int, atol: float) -> None:
    """Every parameter and buffer of unit k_a in state a equals unit k_b in state b (within atol)."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(unit_of(solver, a[name], k_a), unit_of(solver, b[name], k_b), rtol=0, atol=atol,
                                   msg=lambda m: f"{name}: {m}")


def assert_nested_close(a: Any, b: Any, where: str = "", atol: float = 1e-6) -> None:
    """Two nested dicts/lists of tensors and numbers are equal (tensors and floats within atol)."""
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, equal_nan=True, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_nested_close(a[key], b[key], f"{where}.{key}", atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_close(x, y, f"{where}[{i}]", atol)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-6, abs=atol, nan_ok=True), where
    else:
        assert a == b, where


def floating_params(solver: StackSolver):
    return [p for p in solver.parameters() if p.is_floating_point()]


def train(solver: StackSolver, data: StackData, steps: int, eval_every: int, **kwargs) -> tuple[StackOutcome, dict]:
    """train_stack, recording the live state at each evaluation: (outcome, {step: snapshot})."""
    states: dict[int, dict] = {}
    config = TrainConfig(steps=steps, eval_every=eval_every, checkpoint_every=kwargs.pop("checkpoint_every", NEVER))
    outcome = train_stack(solver, data, config, on_eval=lambda step, row: states.__setitem__(step, solver.snapshot()),
                          **kwargs)
    return outcome, states


def unit_history(solver: StackSolver, outcome: StackOutcome) -> tuple[list[int], torch.Tensor]:
    """Evaluated steps and validation MMD per unit [evals, units] (mean over maps for a shared model)."""
    steps = [row["step"] for row in outcome.history]
    mmd = torch.tensor([row["mmd"] for row in outcome.history], dtype=torch.float64)
    return steps, mmd.mean(1, keepdim=True) if solver.shared else mmd


# -- contract: every registered trainable solver and the toys ----------------------------------------


@pytest.mark.parametrize("name", CONTRACT)
def test_stacked_equals_one_at_a_time(name):
    """K=3 maps trained 20 steps as one stack (train_stack, float64) equal each map trained alone
    with the same seed and data: every parameter and buffer within 1e-5, and the same best step."""
    if SOLVERS[name].shared:
        pytest.skip("a shared model couples its contexts by design: there is no map alone")
    config = dict(steps=20, eval_every=NEVER)

    def run(maps):
        data, solver = fresh(name, maps, double=True)
        outcome, _ = train(solver, data, **config)
        return solver, outcome

    stacked, stacked_outcome = run((0, 1, 2))
    start = fresh(name, (0, 1, 2), double=True)[1].snapshot()
    assert max((stacked.snapshot()[n] - start[n]).abs().max().item() for n in start) > 1e-4, "nothing trained"
    for k in range(3):
        alone, alone_outcome = run((k,))
        assert_unit_close(stacked, stacked.snapshot(), k, alone.snapshot(), 0, atol=1e-5)
        assert stacked_outcome.best_step[k] == alone_outcome.best_step[0]


class Interrupted(Exception):
    """Raised from on_progress to stop a run right after a checkpoint (a killed worker)."""


def interrupted_run(name: str, steps: int, cut: int, path: Path, eval_every: int) -> StackSolver:
    """Train `steps` steps with a checkpoint every `cut` steps, and stop right after step `cut`."""
    data, solver = fresh(name)

    def stop(done: int) -> None:
        if done == cut:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_stack(solver, data, TrainConfig(steps=steps, eval_every=eval_every, checkpoint_every=cut),
                    checkpoint=path, on_progress=stop)
    assert path.exists()
    return solver


def assert_same_run(a: tuple[StackData, StackSolver, StackOutcome], b: tuple[StackData, StackSolver, StackOutcome]) -> None:
    """Two runs ended the same: state, optimizer and scheduler state, outcome, history, draws."""
    (data_a, solver_a, out_a), (data_b, solver_b, out_b) = a, b
    assert_nested_close(solver_a.snapshot(), solver_b.snapshot(), "state")
    assert_nested_close(solver_a.training_state(), solver_b.training_state(), "training")
    assert out_a.best_step == out_b.best_step
    assert out_a.best_mmd == pytest.approx(out_b.best_mmd, rel=1e-6)
    assert out_a.diverged == out_b.diverged
    assert data_a.draws == data_b.draws
    assert_nested_close(out_a.history, out_b.history, "history")


@pytest.mark.parametrize("name", CONTRACT)
def test_checkpoint_resume_equals_uninterrupted_run(name, tmp_path: Path):
    """20 straight steps == a run stopped after step 12 (right after its checkpoint) + a fresh solver
    and StackData resumed to 20: weights, optimizer and scheduler state, best steps and MMDs,
    divergence, draw counter and history. For TwoPhase the cut falls inside its fit phase, after its
    StepLR has decayed the learning rate."""
    steps, cut, eval_every = 20, 12, 4
    data, straight = fresh(name)
    straight_run = (data, straight, train(straight, data, steps, eval_every)[0])
    path = tmp_path / "stack.pt"
    first = interrupted_run(name, steps, cut, path, eval_every)
    saved = load_checkpoint(path)
    assert saved["step"] == cut
    assert saved["training"]["schedulers"].keys() == first.schedulers.keys()
    data, resumed = fresh(name)
    resumed_run = (data, resumed, train(resumed, data, steps, eval_every, checkpoint=path)[0])
    assert_same_run(straight_run, resumed_run)
    if name == TwoPhase.name:
        plan = TwoPhase.plan(first.config, steps)
        assert plan.phase_at(cut).name == "fit" and plan.phase_at(cut - 1).name == "fit"  # mid-phase
        assert first.schedulers["fit"].get_last_lr()[0] < first.config.lr  # the scheduler was active
        assert resumed.schedulers["fit"].get_last_lr() == straight.schedulers["fit"].get_last_lr()


@pytest.mark.parametrize("name", CONTRACT)
def test_restore_and_blend_by_mask(name):
    """restore_maps(snapshot, mask) sets exactly the selected units back; blend(keep, take, mask)
    takes exactly the selected units from `take`."""
    data, solver = fresh(name)
    before = solver.snapshot()
    with torch.no_grad():
        for t in solver.state_dict(keep_vars=True).values():
            if t.is_floating_point():
                t.add_(1.0)
    moved = solver.snapshot()
    masks = [[True], [False]] if solver.shared else [[True, False, True], [False, True, False]]
    for values in masks:
        mask = torch.tensor(values)
        solver.load_state_dict(moved)
        solver.restore_maps(before, mask)
        restored, blended = solver.snapshot(), solver.blend(moved, before, mask)
        for k, selected in enumerate(values):
            expected = before if selected else moved
            assert_unit_close(solver, restored, k, expected, k, atol=0)
            assert_unit_close(solver, blended, k, expected, k, atol=0)


@pytest.mark.parametrize("name", CONTRACT)
def test_transport_shapes_and_weights(name):
    """transport(x [K, n, d], contexts [K, c]) gives finite cells [K, n, d] and weights None or
    [K, n] >= 0; map k's output depends on x[k] only; without a context a solver either works
    the same way or refuses with a ValueError that says it needs one."""
    data, solver = fresh(name)
    train_by_hand(solver, data, 4)
    x = torch.randn(3, 11, DIM, generator=torch.Generator().manual_seed(0))

    def check(out: Transport) -> None:
        assert out.cells.shape == (3, 11, DIM)
        assert bool(torch.isfinite(out.cells).all())
        if out.weights is not None:
            assert out.weights.shape == (3, 11)
            assert bool((out.weights >= 0).all()) and bool(torch.isfinite(out.weights).all())

    out = solver.transport(x, data.contexts)
    check(out)
    other = x.clone()
    other[1] += 5.0
    changed = solver.transport(other, data.contexts)
    for k in (0, 2):
        torch.testing.assert_close(changed.cells[k], out.cells[k], rtol=0, atol=0)
    try:
        bare = solver.transport(x)
    except ValueError as error:
        assert "context" in str(error)
    else:
        check(bare)


@pytest.mark.parametrize("name", CONTRACT)
def test_save_load_round_trip(name, tmp_path: Path):
    """save_maps -> SavedMaps -> predict_cells gives exactly the live solver's predictions (cells and
    weights), with the saved contexts, map names and options."""
    data, solver = fresh(name)
    train_by_hand(solver, data, 4)
    keys = [MapKey(None, f"p{k}") for k in range(3)]
    path = tmp_path / "maps.pt"
    save_maps(path, solver, keys, data.contexts, {"seed": 0})
    saved = SavedMaps(path)
    assert saved.names == ["p0", "p1", "p2"]
    assert type(saved.solver) is type(solver) and saved.solver.config == solver.config
    torch.testing.assert_close(saved.contexts, data.contexts, rtol=0, atol=0)
    x = [ARRAYS[2][k] for k in range(3)]  # each map's validation controls (different counts)
    live = predict_cells(solver, x, CPU, data.contexts, chunk=25)
    loaded = predict_cells(saved.solver, x, CPU, saved.contexts, chunk=25)
    for k, ((cells, weights), (cells_l, weights_l)) in enumerate(zip(live, loaded)):
        assert cells.shape == x[k].shape
        np.testing.assert_array_equal(cells, cells_l)
        assert (weights is None) == (weights_l is None)
        if weights is not None:
            np.testing.assert_array_equal(weights, weights_l)


@pytest.mark.parametrize("name", CONTRACT)
def test_divergence_freezes_the_unit_at_its_best_state(name):
    """Map 1's parameters (a shared model: all of them) turn NaN after step 10 of 16: it is marked
    diverged (shared: every map) and left at its best state from before; the other maps end exactly
    as in a clean run."""
    steps, corrupt_after, eval_every = 16, 10, 4

    def run(corrupt: bool):
        data, solver = fresh(name)
        if corrupt:
            train_step = solver.train_step

            def corrupted(data_, step, phase):
                logs = train_step(data_, step, phase)
                if step == corrupt_after:
                    with torch.no_grad():
                        for p in floating_params(solver):
                            p.fill_(float("nan")) if solver.shared else p[1].fill_(float("nan"))
                return logs

            solver.train_step = corrupted
        outcome, states = train(solver, data, steps, eval_every)
        return solver, outcome, states

    clean, clean_out, clean_states = run(False)
    bad, bad_out, _ = run(True)
    assert clean_out.diverged == [False] * 3
    assert bad_out.diverged == ([True] * 3 if bad.shared else [False, True, False])
    final = bad.snapshot()
    assert all(bool(torch.isfinite(t).all()) for t in final.values() if t.is_floating_point())
    best = bad_out.best_step[1]
    assert best <= corrupt_after
    assert_unit_close(bad, final, 1, clean_states[best], 1, atol=1e-6)
    if bad.shared:
        assert bad_out.best_step == [best] * 3
    else:
        for k in (0, 2):
            assert_unit_close(bad, final, k, clean.snapshot(), k, atol=1e-6)
            assert bad_out.best_step[k] == clean_out.best_step[k]
            assert bad_out.best_mmd[k] == pytest.approx(clean_out.best_mmd[k], rel=1e-6)


@pytest.mark.parametrize("name", CONTRACT)
def test_final_state_is_the_best_selectable_state(name):
    """Each unit ends at the evaluated state of lowest validation MMD (a shared model: mean over its
    maps) among the steps its plan lets select; history rows name the phase that led to them."""
    data, solver = fresh(name)
    steps = 12
    outcome, states = train(solver, data, steps, eval_every=3)
    plan = solver.plan(solver.config, steps)
    evaluated, mmd = unit_history(solver, outcome)
    assert evaluated == sorted(set(range(0, steps + 1, 3)) | plan.ends() | {0})
    assert evaluated == evaluation_steps(plan, 3)  # what a tune search expects its reports at
    assert [row["phase"] for row in outcome.history] == [plan.phase_at(max(s - 1, 0)).name for s in evaluated]
    selectable = [i for i, s in enumerate(evaluated) if plan.selects_at(s)]
    final = solver.snapshot()
    for u in range(solver.n_units):
        i = min(selectable, key=lambda j: mmd[j, u].item())
        assert outcome.best_step[u] == evaluated[i]
        assert outcome.best_mmd[u] == pytest.approx(mmd[i, u].item(), rel=1e-5)
        assert_unit_close(solver, final, u, states[evaluated[i]], u, atol=0)


# -- phases ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONTRACT + [Scripted.name])
def test_plan_phases_sum_to_the_steps(name):
    """plan(config, steps): named phases (distinct names, steps >= 0) whose steps sum to `steps`;
    every step belongs to exactly the phase that spans it."""
    cls = SOLVERS[name]
    config = make_config(cls.Config, FAST.get(name, {}))
    for steps in (0, 1, 7, 20):
        plan = cls.plan(config, steps)
        names = [p.name for p in plan.phases]
        assert all(names) and len(set(names)) == len(names)
        assert all(p.steps >= 0 for p in plan.phases)
        assert plan.total == sum(p.steps for p in plan.phases) == steps
        for phase, start, end in plan.spans():
            assert all(plan.phase_at(s) is phase for s in range(start, end))


def test_plan_selection_rules():
    """selects_at: true inside and at both ends of a selecting phase (its start state included),
    false strictly inside a non-selecting one."""
    plan = TwoPhase.plan(TwoPhaseConfig(), 10)
    assert [(p.name, p.steps, p.selects_best) for p in plan.phases] == [("warmup", 5, False), ("fit", 5, True)]
    assert [plan.selects_at(s) for s in range(11)] == [False] * 5 + [True] * 6
    assert plan.ends() == {5, 10}
    with pytest.raises(IndexError):
        plan.phase_at(10)


@pytest.mark.parametrize("script, best", [("inside", 9), ("start", 6)])
def test_best_state_never_comes_from_a_non_selecting_phase(script, best):
    """A state inside the non-selecting warmup is never chosen, even when it has the lowest
    validation MMD of the run (script `inside`: exact at step 2); the state a selecting phase starts
    from may be (script `start`: the fit only gets worse than its start, step 6)."""
    data, solver = fresh(Scripted.name, script=script)
    outcome, states = train(solver, data, steps=12, eval_every=1)
    evaluated, mmd = unit_history(solver, outcome)
    assert evaluated == list(range(13))
    if script == "inside":  # precondition: the overall best lies strictly inside the warmup
        assert mmd.argmin(0).tolist() == [2, 2, 2]
    assert outcome.best_step == [best] * 3
    assert [row["phase"] for row in outcome.history] == ["warmup"] * 7 + ["fit"] * 6
    final = solver.snapshot()
    for k in range(3):
        assert_unit_close(solver, final, k, states[best], k, atol=0)


def test_lr_scheduler_is_checkpointed_and_resumes_between_evaluations(tmp_path: Path):
    """TwoPhase stopped after step 13 (inside its fit phase, between two evaluations) and resumed
    equals the straight run: StepLR state, weights, and the logged averages of the evaluation window
    that the cut split (the loop must carry the running sums across a resume)."""
    steps, cut, eval_every = 20, 13, 4
    data, straight = fresh(TwoPhase.name)
    straight_run = (data, straight, train(straight, data, steps, eval_every)[0])
    path = tmp_path / "stack.pt"
    first = interrupted_run(TwoPhase.name, steps, cut, path, eval_every)
    saved = load_checkpoint(path)["training"]["schedulers"]["fit"]
    assert saved["last_epoch"] == cut - steps // 2  # the fit phase's steps so far
    assert saved["_last_lr"] == first.schedulers["fit"].get_last_lr()
    data, resumed = fresh(TwoPhase.name)
    resumed_run = (data, resumed, train(resumed, data, steps, eval_every, checkpoint=path)[0])
    assert resumed.schedulers["fit"].get_last_lr() == straight.schedulers["fit"].get_last_lr()
    assert_same_run(straight_run, resumed_run)


# -- contexts ----------------------------------------------------------------------------------------


def test_validation_and_prediction_pass_the_per_map_contexts(tmp_path: Path):
    """validation_mmd, every evaluation of train_stack and predict_cells (every chunk, live or loaded)
    pass the per-map contexts [K, c] to transport."""
    data, solver = fresh(SharedContext.name)
    validation_mmd(solver, data)
    assert len(solver.seen) == 1
    torch.testing.assert_close(solver.seen[0], data.contexts, rtol=0, atol=0)

    solver.seen.clear()
    outcome, _ = train(solver, data, steps=6, eval_every=2)
    assert len(solver.seen) == len(outcome.history) == 4  # training itself reads batch contexts
    for context in solver.seen:
        torch.testing.assert_close(context, data.contexts, rtol=0, atol=0)

    keys = [MapKey(None, f"p{k}") for k in range(3)]
    save_maps(tmp_path / "maps.pt", solver, keys, data.contexts, {})
    loaded = SavedMaps(tmp_path / "maps.pt")
    x = [ARRAYS[2][k] for k in range(3)]
    for model, contexts in ((solver, data.contexts), (loaded.solver, loaded.contexts)):
        model.seen.clear()
        predicted = predict_cells(model, x, CPU, contexts, chunk=20)
        assert len(model.seen) == math.ceil(max(len(a) for a in x) / 20)
        for context in model.seen:
            torch.testing.assert_close(context, data.contexts, rtol=0, atol=0)
        for k in range(3):  # map k's cells were moved with map k's context
            expected = solver._move(torch.from_numpy(x[k]), data.contexts[k].expand(len(x[k]), -1)).detach()
            np.testing.assert_allclose(predicted[k][0], expected.numpy(), rtol=0, atol=1e-6)


def test_evaluate_maps_passes_the_per_map_contexts_and_scores_the_baselines():
    """evaluate_maps predicts each map's test controls with the stack's contexts, and scores the
    mean_shift and gaussian maps fitted on the stack's training cells beside the model."""
    data, solver = fresh(SharedContext.name)
    keys = [MapKey(f"g{k}", "drug") for k in range(3)]  # map k: group gk

    def cells(group: str, condition: str, split: str, space: str = "train") -> np.ndarray:
        k = int(group[1:])
        return ARRAYS[2][k] if condition == "ctrl" else ARRAYS[3][k]

    prepared = SimpleNamespace(spec=SimpleNamespace(control="ctrl"), embedding=None, markers={}, cells=cells,
                               has_training_cells=lambda key: True)
    results = evaluate_maps(prepared, keys, solver, data, seed=0)
    assert len(results) == 3 and len(solver.seen) == 1
    torch.testing.assert_close(solver.seen[0], data.contexts, rtol=0, atol=0)
    gaussian = build_solver("gaussian", 3, data.dim)
    gaussian.initialize(data, [])
    by_gaussian = predict_cells(gaussian, ARRAYS[2], CPU)
    for k, (rows, predicted, weights) in enumerate(results):
        assert predicted.shape == ARRAYS[2][k].shape and weights is None
        mmd_of = {r.split: r.value for r in rows if r.metric == "mmd"}
        assert set(mmd_of) == {"test", "test_identity", "test_observed", "test_mean_shift", "test_gaussian"}
        # fewer cells than the metrics' subsample size: the baseline's row is its prediction's score
        direct = evaluate_map(by_gaussian[k][0], ARRAYS[3][k], ARRAYS[2][k], ARRAYS[3][k], knn=False, sinkhorn=False)
        assert mmd_of["test_gaussian"] == pytest.approx(next(r.value for r in direct if r.split == "test" and r.metric == "mmd"), rel=1e-6)


def test_batches_carry_their_cells_contexts():
    """source_sample/target_sample gather per-cell contexts with the same index as the cells; without
    them each cell gets its map's context; without any context, None."""
    per_cell = [[a[:, :1] * 10.0 for a in pop] for pop in ARRAYS[:2]]  # context = 10 x first coordinate
    data = StackData(*ARRAYS, seeds=SEEDS, batch_size=16, contexts=CONTEXTS,
                     source_contexts=per_cell[0], target_contexts=per_cell[1])
    for batch in (data.source_sample(), data.target_sample()):
        assert batch.context.shape == (3, 16, 1)
        torch.testing.assert_close(batch.context, batch.cells[..., :1] * 10.0, rtol=0, atol=0)
    batch = make_data().source_sample()
    torch.testing.assert_close(batch.context, torch.from_numpy(CONTEXTS).unsqueeze(1).expand(-1, 32, -1))
    assert StackData(*ARRAYS, seeds=SEEDS, batch_size=8).source_sample().context is None


# -- shared models -----------------------------------------------------------------------------------


def test_shared_model_selects_on_the_mean_validation_mmd():
    """A shared model is one selection unit: every map gets the same best step, the argmin of the mean
    validation MMD over its contexts, and the same best MMD (that mean)."""
    data, solver = fresh(SharedContext.name)
    outcome, states = train(solver, data, steps=16, eval_every=2)
    mean = torch.tensor([row["mmd"] for row in outcome.history], dtype=torch.float64).mean(1)
    i = int(mean.argmin())
    assert outcome.best_step == [outcome.history[i]["step"]] * 3
    assert outcome.best_mmd == pytest.approx([mean[i].item()] * 3, rel=1e-5)
    assert all(len(row["loss"]) == len(row["gap"]) == 3 for row in outcome.history[1:])  # [1] and [K] logs
    assert_nested_close(solver.snapshot(), states[outcome.best_step[0]], "state", atol=0)


def test_shared_restore_and_blend_work_without_a_map_axis():
    """restore_maps / blend on a shared model (tensors without a map axis, a 0-dim one included)
    take the whole model or nothing."""
    data, solver = fresh(SharedContext.name)
    assert solver.n_units == 1 and solver.log_scale.dim() == 0
    before = solver.snapshot()
    with torch.no_grad():
        for p in solver.parameters():
            p.add_(1.0)
    moved = solver.snapshot()
    assert_nested_close(solver.blend(moved, before, torch.tensor([True])), before, atol=0)
    assert_nested_close(solver.blend(moved, before, torch.tensor([False])), moved, atol=0)
    solver.restore_maps(before, torch.tensor([False]))
    assert_nested_close(solver.snapshot(), moved, atol=0)
    solver.restore_maps(before, torch.tensor([True]))
    assert_nested_close(solver.snapshot(), before, atol=0)


# -- import hygiene ----------------------------------------------------------------------------------

CORE = ["engine.train.loop", "engine.train.stack_data", "engine.train.worker", "engine.train.stack",
        "engine.train.evaluation", "engine.train.saved_maps", "engine.solvers", "engine.nn"]


def test_training_core_imports_without_ray():
    """Importing the training core (loop, data, worker, evaluation, saved maps, solvers, nn) loads
    neither Ray nor engine.api."""
    code = f"import sys\nimport {', '.join(CORE)}\nprint(sorted(m for m in ('ray', 'engine.api') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def engine_modules() -> dict[str, Path]:
    """Every module under engine/ by dotted name (a package by its __init__)."""
    out = {}
    for path in sorted((REPO / "engine").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(imported module, names) of every import run when the module is imported: module and class
    bodies, if/try/with blocks; not function bodies, not `if TYPE_CHECKING:` blocks."""
    found: list[tuple[str, list[str]]] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.Import):
                found.extend((alias.name, []) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                found.append((base, [alias.name for alias in node.names]))
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    block = getattr(node, field, None)
                    if isinstance(block, list):
                        visit([s for s in block if isinstance(s, ast.stmt)] +
                              [s for h in block if isinstance(h, ast.ExceptHandler) for s in h.body])
    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> engine modules its import runs. Importing a.b.c runs a and a.b first (the implicit
    parent edges), except a package that contains the importer: it is already being initialised.
    `from pkg import name` needs pkg, and pkg.name too when that is a module."""
    modules = engine_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
        for target, names in module_level_imports(ast.parse(path.read_text()), module, path.name == "__init__.py"):
            if target.split(".")[0] != "engine":
                continue
            needed = {target} | {f"{target}.{n}" for n in names if f"{target}.{n}" in modules}
            parts = target.split(".")
            parents = {".".join(parts[:i]) for i in range(1, len(parts))}
            edges = needed | (parents - own_packages)
            graph[module] |= {m for m in edges if m in modules and m != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as [a, b, ..., a], or None."""
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if color.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in color and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        color[node] = 2
        return None

    for node in sorted(graph):
        if node not in color and (cycle := visit(node)):
            return cycle
    return None


def test_engine_has_no_import_cycle():
    """The module-level imports between engine modules (implicit parent-package edges included,
    function-level and TYPE_CHECKING imports excluded) form no cycle."""
    graph = import_graph()
    assert "engine.train.loop" in graph and "engine.solvers.base" in graph["engine.train.loop"]
    assert "engine.solvers" in graph["engine.train.loop"]  # the implicit parent edge
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_cycles():
    """find_cycle reports a planted cycle (and the parent-edge rule of import_graph)."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a_selecting_plan_must_end_in_a_selecting_phase():
    """A trailing phase that does not select would be trained and thrown away: refused."""
    Plan((Phase("a", 3, selects_best=False), Phase("b", 3)))
    Plan((Phase("a", 3, selects_best=False),))  # nothing selects: the last state is the result
    with pytest.raises(ValueError, match="must end in a selecting phase"):
        Plan((Phase("a", 3), Phase("b", 3, selects_best=False)))
    with pytest.raises(ValueError, match="distinct"):
        Plan((Phase("a", 3), Phase("a", 3)))
