"""perturbot tune: search spaces, a search with ASHA into the store, its leaderboard and best config, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.cli import main
from engine.config import RunConfig
from engine.data import make_synthetic
from engine.options import DataError
from engine.store import Store
from tune.space import SearchSpace, configure, default_space

REPO = Path(__file__).resolve().parents[1]
STEPS, EVAL_EVERY = 20, 5
REPORTS = [0, 5, 10, 15, 20]
# small networks and batches: a trial is a few hundred ms of training on one core
SMALL_SPACE = {
    "solver.lr": {"loguniform": [1.0e-4, 3.0e-2]},
    "solver.hidden": {"layers": {"width": [8, 16], "depth": [2, 3]}},
    "solver.init": {"choice": ["uniform", "gaussian"]},
    "solver.betas": {"choice": [[0.5, 0.9], [0.9, 0.999]]},
    "train.batch_size": {"choice": [32, 64]},
}


def _base(solver: str = "cellot", **flags) -> RunConfig:
    return RunConfig.resolve(None, [], dataset="x.h5ad", condition_key="condition", control="control",
                             solver=solver, steps=STEPS, **flags)


def test_shipped_spaces_load_and_decode():
    for solver in ("cellot", "w1ot"):
        space = SearchSpace.load(default_space(solver), _base(solver))
        assert "solver.hidden.width" in space.sample_space() and "solver.hidden" not in space.sample_space()
    space = SearchSpace.parse(SMALL_SPACE, _base())
    sampled = {"solver.lr": 1e-3, "solver.hidden.width": 16, "solver.hidden.depth": 3, "solver.init": "gaussian",
               "solver.betas": "[0.9, 0.999]", "train.batch_size": 64}
    params = space.decode(sampled)
    assert params["solver.hidden"] == [16, 16, 16] and params["solver.betas"] == [0.9, 0.999]
    config = configure(_base(), params)
    assert config.solver_config().hidden == (16, 16, 16) and config.solver_config().betas == (0.9, 0.999)
    assert config.train.batch_size == 64 and config.train.steps == STEPS


@pytest.mark.parametrize("raw, needle", [
    ({"solver.lr_typo": {"choice": [1]}}, "lr_typo"),
    ({"data.seed": {"choice": [1]}}, "data.seed"),
    ({"solver.lr": {"normal": [0, 1]}}, "loguniform"),
    ({"solver.lr": {"loguniform": [0, 1]}}, "lo > 0"),
    ({"solver.init": {"choice": ["uniform", "nonsense"]}}, "nonsense"),
    ({"solver.hidden": {"layers": {"width": [8]}}}, "layers"),
    ({"train.steps": {"choice": [10, 20]}}, "--steps"),
])
def test_bad_spaces_are_one_line_errors(raw, needle):
    with pytest.raises(DataError, match=needle):
        SearchSpace.parse(raw, _base())


def test_a_space_that_moves_the_phases_is_refused():
    """ASHA compares trials at the same reports: W1OT's potential_fraction would move them."""
    with pytest.raises(DataError, match="phases"):
        SearchSpace.parse({"solver.potential_fraction": {"uniform": [0.3, 0.7]}}, _base("w1ot"))


def test_asha_judges_no_trial_before_it_trained_in_a_selecting_phase():
    """Grace period: CellOT from its first trained report; W1OT after its potential phase and
    some step-size training (the state the step-size phase starts from is not yet trained)."""
    from engine.solvers import solver_class
    from engine.train.loop import evaluation_steps
    from tune.search import grace_period

    for solver, steps, eval_every, expected in (("cellot", 20, 5, 2), ("w1ot", 20, 5, 4), ("w1ot", 25, 10, 4)):
        cls = solver_class(solver)
        plan = cls.plan(_base(solver).solver_config(), steps)
        reports = evaluation_steps(plan, eval_every)
        assert grace_period(plan, reports) == expected, (solver, reports)


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    path = tmp_path_factory.mktemp("tune") / "cells.h5ad"
    make_synthetic(n_perturbations=2, n_groups=2, dim=5, n_cells=120, seed=3).write_h5ad(path)
    return path


def _tune_argv(h5ad: Path, out: Path, space: Path, samples: int = 8, solver: str = "cellot") -> list[str]:
    faster = ["--set", "solver.conjugate_steps=2"] if solver == "cellot" else []
    return ["tune", "--data", str(h5ad), "--condition-key", "condition", "--control", "control",
            "--split-by", "group", "--perturbations", "pert0", "--space", str(space), "--samples", str(samples),
            "--max-concurrent", "2", "--steps", str(STEPS), "--set", f"train.eval_every={EVAL_EVERY}",
            "--solver", solver, *faster, "--out", str(out)]


def test_optuna_absent_is_a_clear_error(h5ad, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SMALL_SPACE))
    assert main(_tune_argv(h5ad, tmp_path / "s", space) + ["--search", "optuna"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "perturbot[tune]" in err and not (tmp_path / "s").exists()


def _check_store(out: Path, samples: int) -> tuple[Store, str]:
    """Every trial once, with exactly one valid row per map and reported step, nothing stale."""
    info = json.loads((out / "run.json").read_text())
    store = Store(info["store"])
    run_id = info["run_id"]
    trials = store.trials(run_id)
    assert len(trials) == samples and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"finished", "stopped"}, trials[["trial_id", "status", "error"]]
    valid = store.metrics(run_id, split="valid", metric="mmd")
    maps = {"g0/pert0", "g1/pert0"}
    for trial in trials.itertuples():
        rows = valid[valid["trial_id"] == trial.trial_id]
        assert not rows.duplicated(["perturbation", "step"]).any()
        assert set(rows["perturbation"]) == maps
        assert sorted(set(rows["step"])) == [s for s in REPORTS if s <= trial.step], trial
        best = store.metrics(run_id, split="valid_best")
        best = best[best["trial_id"] == trial.trial_id]
        assert len(best) == (2 if trial.status == "finished" else 0)
        if trial.status == "finished":  # each map's best over the selecting reports; the trial's score is their mean
            assert trial.step == STEPS
            per_map = rows.groupby("perturbation")["value"].min()
            assert best.set_index("perturbation")["value"].to_dict() == pytest.approx(per_map.to_dict())
            assert trial.best_mmd == pytest.approx(per_map.mean())
    identity = store.metrics(run_id, split="valid_identity")
    assert set(identity["perturbation"]) == maps and set(identity["trial_id"]) == {""}
    return store, run_id


def test_search_with_asha_into_the_store_then_train_the_winner(ray_session, one_thread, h5ad, tmp_path, capsys):
    """Acceptance: 8 trials, ASHA, 2 at once; every trial in the store, >= 1 stopped early, a
    leaderboard, and a best.yaml that `perturbot train --config` runs on every perturbation."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SMALL_SPACE))
    out = tmp_path / "search"
    started = time.perf_counter()
    assert main(_tune_argv(h5ad, out, space)) == 0
    seconds = time.perf_counter() - started
    printed = capsys.readouterr().out
    store, run_id = _check_store(out, 8)
    trials = store.trials(run_id)
    assert (trials["status"] == "stopped").sum() >= 1, trials
    assert (trials["status"] == "finished").sum() >= 1, trials
    assert f"search {run_id}" in printed and "8 trials" in printed and "ratio" in printed, printed
    best = trials.sort_values("best_mmd").iloc[0]
    assert best["trial_id"] in printed.split("rank")[1].splitlines()[1]  # rank 1 is the lowest best_mmd
    run = store.runs().set_index("run_id").loc[run_id]
    assert run["kind"] == "tune" and run["status"] == "finished"
    print(f"search of 8 trials: {seconds:.1f} s", file=sys.stderr)

    best_yaml = yaml.safe_load((out / "best.yaml").read_text())
    params = json.loads(best["params_json"])
    assert best_yaml["solver"]["hidden"] == params["solver.hidden"] and best_yaml["solver"]["lr"] == params["solver.lr"]
    assert best_yaml["data"]["perturbations"] is None and best_yaml["train"]["steps"] == STEPS
    trained = tmp_path / "winner"
    assert main(["train", "--config", str(out / "best.yaml"), "--steps", "5", "--set", "train.eval_every=5", "--out", str(trained)]) == 0
    from engine.api import FitResult

    result = FitResult.load(trained)
    assert len(result.maps()) == 4 and result.succeeded()  # all maps, not only the tuning subset
    assert list(result.config.solver_config().hidden) == params["solver.hidden"]

    capsys.readouterr()
    assert main(["metrics", "--run", str(out)]) == 0
    by_dir = capsys.readouterr().out
    assert main(["metrics", "--run", run_id, "--store", store.url]) == 0
    assert capsys.readouterr().out == by_dir and "8 trials" in by_dir
    assert main(["metrics", "--run", str(out), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("rank,trial_id,status,step,best_mmd,ratio")
    assert main(["report", "--run", str(out)]) == 0  # a search's report: leaderboard and trial curves
    page = (out / "report.html").read_text()
    assert "Leaderboard" in page and page.count("data:image/png;base64,") == 1 and best["trial_id"] in page
    store.close()


def test_a_search_tunes_on_the_groups_given(ray_session, one_thread, h5ad, tmp_path, capsys):
    """--only-groups g1: the tuning maps are g1's only (g0's cells are not in the search), and best.yaml
    keeps every group and perturbation."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SMALL_SPACE))
    out = tmp_path / "search"
    assert main(_tune_argv(h5ad, out, space, samples=1) + ["--only-groups", "g1", "--scheduler", "fifo"]) == 0
    info = json.loads((out / "run.json").read_text())
    with Store(info["store"]) as store:
        for split in ("valid", "valid_best", "valid_identity"):
            assert set(store.metrics(info["run_id"], split=split)["perturbation"]) == {"g1/pert0"}, split
        assert len(store.trials(info["run_id"])) == 1
    from engine.data import PreparedData

    assert {g for g, _, _ in PreparedData.load(out / "data").tables} == {"g1"}
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["data"]["groups"] is None and best["data"]["perturbations"] is None
    assert best["data"]["split_by"] == "group"


@pytest.mark.slow
def test_killed_search_resumes_without_redoing_finished_trials(ray_session, h5ad, tmp_path, capsys):
    """Kill the driver (SIGKILL) once two trials have ended, resume: 8 trials, each once in the store,
    exact rows (also for a trial that ran again), and the trials Tune had saved as ended not rerun."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SMALL_SPACE))
    out = tmp_path / "search"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = _tune_argv(h5ad, out, space) + ["--scheduler", "fifo"]
    driver = subprocess.Popen([sys.executable, "-m", "engine.cli", *argv], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ended: list[str] = []
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.5)
            if (out / "run.json").exists():
                with Store(json.loads((out / "run.json").read_text())["store"]) as store:
                    trials = store.trials(json.loads((out / "run.json").read_text())["run_id"])
                ended = list(trials.loc[trials["status"] == "finished", "trial_id"])
                if len(ended) >= 2 and (trials["status"] == "running").any():
                    driver.send_signal(signal.SIGKILL)
                    break
    finally:
        driver.kill()
        driver.wait()
    assert driver.returncode == -signal.SIGKILL and len(ended) >= 2, "the search ended before it could be killed"
    experiment = next((out / "ray").iterdir())
    saved = _terminated(experiment)  # the trials Tune's saved state knows as ended (it saves every second)
    assert saved, "Tune had saved no ended trial before the kill"
    lines_before = {t: _result_lines(experiment, t) for t in saved}

    assert main(["tune", "--resume", "--out", str(out)]) == 0
    store, run_id = _check_store(out, 8)
    assert set(store.trials(run_id)["status"]) == {"finished"}  # FIFO: every trial runs to the end
    assert {t: _result_lines(experiment, t) for t in saved} == lines_before  # ended trials did not run again
    store.close()


def _terminated(experiment: Path) -> set[str]:
    state = json.loads(sorted(experiment.glob("experiment_state-*.json"))[-1].read_text())
    trials = [json.loads(trial) for trial, _ in state["trial_data"]]
    return {t["trial_id"] for t in trials if t["status"] == "TERMINATED"}


def _result_lines(experiment: Path, trial_id: str) -> int:
    (trial_dir,) = [d for d in experiment.iterdir() if d.is_dir() and trial_id in d.name]
    return len((trial_dir / "result.json").read_text().splitlines())


@pytest.mark.slow
def test_optuna_search_when_the_extra_is_installed(ray_session, one_thread, h5ad, tmp_path, capsys):
    """--search optuna (TPE) with the `tune` extra: the same store rows as a random search."""
    pytest.importorskip("optuna", reason="needs the optional extra: pip install 'perturbot[tune]'")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SMALL_SPACE))
    out = tmp_path / "search"
    assert main(_tune_argv(h5ad, out, space, samples=4) + ["--search", "optuna", "--scheduler", "fifo"]) == 0
    store, run_id = _check_store(out, 4)
    params = [json.loads(p) for p in store.trials(run_id)["params_json"]]
    assert all(p["solver.betas"] in ([0.5, 0.9], [0.9, 0.999]) and len(set(p["solver.hidden"])) == 1 for p in params)
    assert (out / "best.yaml").is_file()
    store.close()


@pytest.mark.slow
def test_failed_trials_are_in_the_store_with_their_error(ray_session, one_thread, h5ad, tmp_path, capsys):
    """Options valid alone but not together (W1OT: widths 20 with 8 GroupSort groups) fail every
    trial: exit 1, each trial `failed` with the solver's one-line error, the run `partial`, no best.yaml."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"solver.hidden": {"layers": {"width": [20], "depth": [2]}},
                                     "solver.groups": {"choice": [8]}}))
    out = tmp_path / "search"
    assert main(_tune_argv(h5ad, out, space, samples=2, solver="w1ot") + ["--scheduler", "fifo"]) == 1
    assert "no trial" in capsys.readouterr().err
    info = json.loads((out / "run.json").read_text())
    with Store(info["store"]) as store:
        trials = store.trials(info["run_id"])
        assert len(trials) == 2 and set(trials["status"]) == {"failed"}
        assert trials["error"].str.contains("GroupSort").all(), trials["error"].tolist()
        assert store.runs().set_index("run_id").loc[info["run_id"], "status"] == "partial"
    assert not (out / "best.yaml").exists()
