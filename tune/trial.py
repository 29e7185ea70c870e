"""One trial: one stack over the tuning maps, trained by the device-level loop inside the trial.

No TorchTrainer runs inside a trial (RAY_NOTES.md: Train inside Tune starves its workers of CPUs
and leaks placement groups when ASHA stops a trial). The trial reads the tuning cells from the
object store (put there once per search by `tune.with_parameters`), trains all the tuning maps as
one stack with `engine.train.loop.train_stack`, and at every evaluation of the loop reports

    mmd       mean over the maps of the validation MMD of the current state,
    best_mmd  mean over the maps of each map's best validation MMD so far, among the states its plan
              may select (inf before the first): the maps `perturbot train` would keep if it stopped
              here; the search's objective and ASHA's metric,
    step, steps, map_mmd, map_best_mmd (per map, in the order of the tuning maps).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from engine.config import RunConfig
from engine.data import PreparedData
from engine.train.loop import train_stack
from engine.train.stack import new_solver, stack_data
from tune.space import SearchSpace, configure


def run_trial(sampled: dict[str, Any], *, prepared: PreparedData, base: dict[str, Any], space: SearchSpace,
              use_gpu: bool) -> None:
    """Tune's function trainable: train the tuning maps with the sampled options, report each evaluation."""
    from ray import tune

    if use_gpu:
        device = torch.device("cuda")  # the trial's GPU (or share of one): Ray sets CUDA_VISIBLE_DEVICES
    else:
        torch.set_num_threads(1)  # a trial holds one CPU
        device = torch.device("cpu")
    config = configure(RunConfig.from_dict(base), space.decode(sampled))
    keys = prepared.maps
    data = stack_data(prepared, keys, config, device)
    solver = new_solver(config, data, device)
    plan = solver.plan(solver.config, config.train.steps)
    best = np.full(len(keys), math.inf)

    def on_eval(step: int, row: dict[str, torch.Tensor]) -> None:
        mmd = row["mmd"].detach().double().cpu().numpy()
        mmd = np.where(np.isfinite(mmd), mmd, math.inf)
        if plan.selects_at(step):
            np.minimum(best, mmd, out=best)
        tune.report({"mmd": float(mmd.mean()), "best_mmd": float(best.mean()), "step": step, "steps": plan.total,
                     "map_mmd": mmd.tolist(), "map_best_mmd": best.tolist()})

    train_stack(solver, data, config.train, on_eval=on_eval)
