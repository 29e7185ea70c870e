"""`perturbot tune`: a hyperparameter search with Ray Tune, aggregated into the metrics store.

    start(config, settings, out)   prepare the tuning maps' cells, run the search, write best.yaml
    resume(out)                    continue an interrupted search (Tune's restore): finished trials
                                   are kept, unfinished ones start again

A trial trains all the tuning maps (`--perturbations` and `--only-groups`, else every map) as one stack
(tune/trial.py) and reports after every evaluation of the loop. ASHA compares trials by `best_mmd`
at its rungs: its time unit is a report, its grace period the first report after training has
started in a phase that selects (so W1OT's potential phase is never judged), reduction factor 2.
Random search samples the space with the run's seed; `--search optuna` needs the `tune` extra.
The search directory holds config.yaml (the base config), search.yaml, data/ (the tuning cells),
ray/ (Tune's experiment), run.json, and best.yaml at the end.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback
from ray.tune.experiment import Trial

from engine.api import file_sha256
from engine.config import RunConfig
from engine.data import PreparedData, prepare, read_h5ad
from engine.options import DataError, parse_options
from engine.rundir import RunDir
from engine.solvers import build_solver
from engine.solvers.base import Plan
from engine.store import Store
from engine.train.loop import evaluation_steps, validation_mmd
from engine.train.stack import stack_data
from tune.results import StoreCallback, describe, end_status, identity_rows, leaderboard
from tune.space import SearchSpace, configure, default_space

SCHEDULERS = ("asha", "fifo")
SEARCHES = ("random", "optuna")
REDUCTION_FACTOR = 2


@dataclass
class SearchSettings:
    """How to search (search.yaml); `space` is the parsed space file's mapping."""

    space: dict[str, Any]
    samples: int = 8
    scheduler: str = "asha"
    search: str = "random"
    max_concurrent: int | None = None  # None: as many trials as the cluster's CPUs (GPUs) hold
    gpus_per_trial: float = 0.0
    reuse_actors: bool = True  # a trial reuses an ended trial's actor (benchmarks/tune_overhead.py: off vs on)

    def __post_init__(self) -> None:
        if self.samples < 1 or (self.max_concurrent is not None and self.max_concurrent < 1) or self.gpus_per_trial < 0:
            raise DataError(f"--samples and --max-concurrent must be >= 1 and --gpus-per-trial >= 0, got "
                            f"{self.samples}, {self.max_concurrent}, {self.gpus_per_trial}")
        if self.scheduler not in SCHEDULERS or self.search not in SEARCHES:
            raise DataError(f"scheduler must be one of {', '.join(SCHEDULERS)} and search one of {', '.join(SEARCHES)}")
        if self.search == "optuna" and importlib.util.find_spec("optuna") is None:
            raise DataError("--search optuna needs Optuna, an optional extra: pip install 'perturbot[tune]' "
                            "(or use --search random)")


@dataclass
class SearchResult:
    """A finished (or resumed) search: its directory, run id, leaderboard and best configuration."""

    dir: RunDir
    run_id: str
    board: Any  # pandas DataFrame (tune.results.leaderboard)
    identity: float

    def describe(self, top: int = 10) -> str:
        return describe(self.board, self.identity, top)


def load_space(config: RunConfig, space_file: str | Path | None) -> dict[str, Any]:
    """The space's mapping, checked against `config` (its shipped file unless one is given)."""
    path = default_space(config.solver) if space_file is None else Path(space_file)
    return SearchSpace.load(path, config).entries


def start(config: RunConfig, settings: SearchSettings, out: str | Path, store_url: str | None = None) -> SearchResult:
    """Prepare the tuning maps' cells, record the search and run it (see the module doc)."""
    directory = RunDir(out)
    if directory.exists():
        raise DataError(f"{out} already holds a run; choose another --out (or --resume to continue a search there)")
    space = SearchSpace.parse(settings.space, config)
    prepared = prepare(read_h5ad(config.dataset), config.data)
    _connect(config, settings)
    directory.root.mkdir(parents=True, exist_ok=True)
    store_url = store_url or directory.default_store
    run_id = f"tune-{config.solver}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    config.save(directory.config)
    directory.search.write_text(yaml.safe_dump(dataclasses.asdict(settings), sort_keys=False))
    prepared.save(directory.data)
    directory.write_info(run_id, store_url, kind="tune")
    with Store(store_url) as store:
        _record_run(store, run_id, config, settings)
        store.upsert_metrics(identity_rows(run_id, [k.name for k in prepared.maps], _identity_mmd(prepared, config)))
    tuner = _tuner(config, settings, space, prepared, directory, run_id, store_url)
    return _finish(tuner, config, directory, run_id, store_url)


def resume(out: str | Path) -> SearchResult:
    """Continue the search in `out` where it stopped (Tune's restore): trials that finished are not
    run again, unfinished ones start from their first step (their earlier rows are replaced)."""
    from ray import tune

    directory = RunDir(out)
    info = directory.read_info() if directory.exists() else {}
    if info.get("kind") != "tune":
        raise DataError(f"{out} holds no search to resume (no run.json of kind tune)")
    config = RunConfig.load(directory.config)
    settings = parse_options(SearchSettings, yaml.safe_load(directory.search.read_text()), "search")
    space = SearchSpace.parse(settings.space, config)
    prepared = PreparedData.load(directory.data)
    experiment = directory.ray_storage / info["run_id"]
    if not tune.Tuner.can_restore(str(experiment)):
        raise DataError(f"{experiment} holds no Tune experiment to restore")
    _connect(config, settings)
    with Store(info["store"]) as store:
        _record_run(store, info["run_id"], config, settings)
    tuner = tune.Tuner.restore(str(experiment), trainable=_trainable(config, settings, space, prepared),
                               resume_unfinished=True, resume_errored=False, restart_errored=False)
    return _finish(tuner, config, directory, info["run_id"], info["store"])


def _record_run(store: Store, run_id: str, config: RunConfig, settings: SearchSettings) -> None:
    """The search's runs row (kind tune; "running" again on resume): the base config and the settings."""
    dataset = Path(config.dataset)
    store.start_run(run_id, "tune", config.solver, dataset.name, file_sha256(dataset),
                    {**config.to_dict(), "search": dataclasses.asdict(settings)})


def _connect(config: RunConfig, settings: SearchSettings) -> None:
    """Join Ray (config.cluster.address) and check that a trial's GPU share exists there."""
    import ray

    from engine.cluster.runtime import connect

    connect(config.cluster.address)
    available = ray.cluster_resources().get("GPU", 0.0)
    if settings.gpus_per_trial > available:
        raise DataError(f"--gpus-per-trial {settings.gpus_per_trial:g} but the Ray cluster has {available:g} GPU(s)")


def _identity_mmd(prepared: PreparedData, config: RunConfig) -> list[float]:
    """Each tuning map's validation MMD with its controls unchanged (the same cells trials are scored on)."""
    import torch

    data = stack_data(prepared, prepared.maps, config, torch.device("cpu"))
    identity = build_solver("identity", len(prepared.maps), data.dim)
    return validation_mmd(identity, data).double().tolist()


def _trainable(config: RunConfig, settings: SearchSettings, space: SearchSpace, prepared: PreparedData) -> Any:
    """The trial function with the tuning cells put in the object store once, and a trial's resources."""
    from ray import tune

    from tune.trial import run_trial

    trainable = tune.with_parameters(run_trial, prepared=prepared, base=config.to_dict(), space=space,
                                     use_gpu=settings.gpus_per_trial > 0)
    return tune.with_resources(trainable, {"cpu": 1, "gpu": settings.gpus_per_trial})


def grace_period(plan: Plan, reports: list[int]) -> int:
    """ASHA's grace period in reports (Tune's training_iteration counts from 1): the first report made
    after some training inside a selecting phase (the last report if there is none)."""
    trained = [any(p.selects_best and start < step <= end for p, start, end in plan.spans()) for step in reports]
    return trained.index(True) + 1 if any(trained) else len(reports)


def _tuner(config: RunConfig, settings: SearchSettings, space: SearchSpace, prepared: PreparedData,
           directory: RunDir, run_id: str, store_url: str) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    plan = config.solver_cls.plan(config.solver_config(), config.train.steps)
    if settings.scheduler == "asha":
        reports = evaluation_steps(plan, config.train.eval_every)
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=len(reports),
                                  grace_period=grace_period(plan, reports), reduction_factor=REDUCTION_FACTOR)
    else:
        scheduler = FIFOScheduler()
    if settings.search == "optuna":  # a Searcher: Tune limits its concurrency (max_concurrent_trials)
        from ray.tune.search.optuna import OptunaSearch

        searcher, limit = OptunaSearch(seed=config.train.seed), settings.max_concurrent
    else:  # a SearchGenerator: it limits its own
        searcher = BasicVariantGenerator(random_state=config.train.seed, max_concurrent=settings.max_concurrent or 0)
        limit = None
    callback = StoreCallback(store_url, run_id, [k.name for k in prepared.maps], space)
    return tune.Tuner(
        _trainable(config, settings, space, prepared),
        param_space=space.sample_space(),
        tune_config=tune.TuneConfig(metric="best_mmd", mode="min", scheduler=scheduler, search_alg=searcher,
                                    num_samples=settings.samples, max_concurrent_trials=limit,
                                    reuse_actors=settings.reuse_actors),
        run_config=tune.RunConfig(name=run_id, storage_path=str(directory.ray_storage),
                                  callbacks=[callback, TrialLog()], verbose=0),
    )


class TrialLog(Callback):
    """One line on stderr as each trial ends (Tune's own tables are off: verbose=0)."""

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        last = trial.last_result
        print(f"trial {trial.trial_id}: {end_status(last)} at step {last.get('step')}/{last.get('steps')}, "
              f"best_mmd {last.get('best_mmd', math.nan):.4g}", file=sys.stderr, flush=True)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        print(f"trial {trial.trial_id}: failed (perturbot metrics --run shows the error)", file=sys.stderr, flush=True)


def _finish(tuner: Any, config: RunConfig, directory: RunDir, run_id: str, store_url: str) -> SearchResult:
    """Run the search; then the run's status, the leaderboard and best.yaml."""
    # Tune saves the search's state (what --resume restores) at most every 10 s by default: a trial that
    # ended since then runs again on resume. Every second keeps that window small (the store is exact anyway).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    status = "failed"
    with Store(store_url) as store:
        try:
            tuner.fit()
            board, identity = leaderboard(store, run_id)
            status = "finished" if board["status"].isin(["finished", "stopped"]).all() else "partial"
        finally:
            store.finish_run(run_id, status)
        if not len(board) or not math.isfinite(board["best_mmd"].iloc[0]):
            raise RuntimeError(f"no trial of search {run_id} reported a validation mmd "
                               "(perturbot metrics --run shows the trials' errors)")
        best = board.iloc[0]
        params = json.loads(store.trials(run_id).set_index("trial_id").loc[best["trial_id"], "params_json"])
    write_best_config(configure(config, params), best, directory, run_id)
    return SearchResult(directory, run_id, board, identity)


def write_best_config(chosen: RunConfig, best: Any, directory: RunDir, run_id: str) -> Path:
    """best.yaml: the best trial's config for every perturbation and group (the tuning subset is dropped:
    `perturbot train --config best.yaml` trains all maps; --perturbations and --only-groups narrow them again)."""
    raw = chosen.to_dict()
    raw["data"]["perturbations"] = raw["data"]["groups"] = None
    header = (f"# best trial {best['trial_id']} of search {run_id}: mean validation mmd {best['best_mmd']:.4g} over "
              f"the tuning maps ({best['ratio']:.3g} x the identity's)\n")
    directory.best_config.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return directory.best_config
