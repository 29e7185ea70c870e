"""A search in the metrics store: what each trial wrote, and the leaderboard read back from it.

One run id for the whole search (runs.kind = "tune"). Rows (trial_id = Tune's trial id):
  trials   one row per trial: params_json (the option values by config path), status (running,
           finished, stopped: ended early by the scheduler, failed), best_mmd (the trial's last
           `best_mmd` report, tune/trial.py), step (its last reported step), error;
  metrics  `valid`/`mmd` per tuning map at every reported step; `valid_best`/`mmd` per map for a
           finished trial (each map's best state, the maps `train` would keep); and once per search,
           with trial_id "", `valid_identity`/`mmd` per map (the control cells unchanged).
All of them are written by StoreCallback on the driver, a single writer; upserts keep them exact, and
a trial that starts again (a resumed search) first drops the rows of its earlier attempt.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import Callback
from ray.tune.experiment import Trial

from engine.store import Store
from tune.space import SearchSpace

STATUSES = ("finished", "stopped", "failed", "running")


def identity_rows(run_id: str, maps: list[str], mmd: list[float]) -> list[dict[str, Any]]:
    """The search's baseline rows: each tuning map's validation MMD with its controls unchanged."""
    return [{"run_id": run_id, "trial_id": "", "perturbation": name, "split": "valid_identity", "metric": "mmd",
             "value": value, "step": 0} for name, value in zip(maps, mmd)]


def end_status(last: dict[str, Any]) -> str:
    """How a trial that ended without error ended: finished (it reported the plan's last step) or
    stopped (by the scheduler)."""
    return "finished" if "step" in last and last["step"] == last["steps"] else "stopped"


class StoreCallback(Callback):
    """Writes every trial's parameters, status and reports to the store, on the driver (picklable: Tune
    saves it with the search and restores it on resume)."""

    def __init__(self, store_url: str, run_id: str, maps: list[str], space: SearchSpace) -> None:
        self.store_url, self.run_id, self.maps, self.space = store_url, run_id, maps, space
        self._store: Store | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.store_url)
        return self._store

    def _rows(self, trial: Trial, split: str, values: list[float], step: int) -> list[dict[str, Any]]:
        return [{"run_id": self.run_id, "trial_id": trial.trial_id, "perturbation": name, "split": split,
                 "metric": "mmd", "value": value, "step": step} for name, value in zip(self.maps, values)]

    def _trial(self, trial: Trial, **fields: Any) -> None:
        self.store.upsert_trials([{"run_id": self.run_id, "trial_id": trial.trial_id, **fields}])

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.store.delete_trial_metrics(self.run_id, trial.trial_id)
        self._trial(trial, params_json=json.dumps(self.space.decode(trial.config), sort_keys=True), status="running",
                    best_mmd=None, step=None, error=None)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        self.store.upsert_metrics(self._rows(trial, "valid", result["map_mmd"], result["step"]))
        self._trial(trial, best_mmd=result["best_mmd"], step=result["step"])

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        last = trial.last_result
        status = end_status(last)
        if status == "finished":
            self.store.upsert_metrics(self._rows(trial, "valid_best", last["map_best_mmd"], last["step"]))
        self._trial(trial, status=status)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        # the driver's copy of the trial's error (the storage copy is synced later): a traceback whose
        # last line is the exception
        text = Path(trial.error_file).read_text() if trial.error_file and Path(trial.error_file).is_file() else ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        self._trial(trial, status="failed", error=lines[-1] if lines else "unknown error (see Tune's trial logs)")

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def leaderboard(store: Store, run_id: str) -> tuple[pd.DataFrame, float]:
    """Trials ranked by best_mmd (failed and unreported last): columns rank, trial_id, status, step,
    best_mmd, ratio (to the identity), error (when a trial failed), then one column per searched
    option; and the identity's mean validation MMD over the tuning maps (NaN if absent)."""
    trials = store.trials(run_id)
    identity = store.metrics(run_id, split="valid_identity", metric="mmd")["value"].mean()
    params = [json.loads(p) if p else {} for p in trials["params_json"]]
    board = pd.DataFrame({
        "trial_id": trials["trial_id"],
        "status": trials["status"],
        "step": trials["step"],
        "best_mmd": trials["best_mmd"].astype(float),
    })
    board["ratio"] = board["best_mmd"] / identity
    if trials["error"].notna().any():
        board["error"] = trials["error"]
    board = pd.concat([board, pd.DataFrame(params, index=board.index)], axis=1)
    board = board.sort_values(["best_mmd", "trial_id"], na_position="last", kind="stable").reset_index(drop=True)
    board.insert(0, "rank", range(1, len(board) + 1))
    return board, float(identity)


def describe(board: pd.DataFrame, identity: float, top: int) -> str:
    """The leaderboard as text: a count by status, the identity's MMD, the best `top` trials."""
    counts = board["status"].value_counts()
    header = (f"{len(board)} trials: " + ", ".join(f"{int(counts[s])} {s}" for s in STATUSES if s in counts)
              + f"; identity mmd {identity:.4g} (mean over the tuning maps; ratio = best_mmd / identity)")
    shown = board.head(top).copy()
    for column in shown.columns:
        if shown[column].map(lambda v: isinstance(v, list)).any():
            shown[column] = shown[column].map(lambda v: "[" + ",".join(map(str, v)) + "]" if isinstance(v, list) else v)
    table = shown.to_string(index=False, float_format=lambda v: f"{v:.4g}" if math.isfinite(v) else str(v))
    return f"{header}\n{table}"
