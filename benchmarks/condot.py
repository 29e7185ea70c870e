"""CondOT: one training context per step (the paper) or all of them, quality against training time.

    python benchmarks/condot.py                 # d = 5, identity init, 600 steps, lr 1e-3 (~ a few min on one core)
    python benchmarks/condot.py --quick         # 60 steps
    python benchmarks/condot.py --init gaussian --lr 1e-4 --out benchmarks/out/condot.json

Data: the synthetic dose response (engine.data.make_dose_response: doses 10..10000, effect along a
fixed direction growing with log10(dose)), dose 1000 held out, contexts log10(dose) / 4. Each case
trains the same CondOT model (same seed) with `contexts_per_step` 1 or 0 (= all three training
contexts per step: 3x the cells per step); every `--every` steps it records the training seconds so
far (train_step only) and the mmd (6 gammas) of the transported test controls to the test cells of
each seen dose (mean) and of the held-out dose. The identity start (default) leaves all the work to
training, so the curves show how fast each way of drawing contexts learns; `seconds_to_target` is
the first training time at which a case's seen-dose mmd is within 10% of the better final value.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script from a checkout: make `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import describe_device, emit  # noqa: E402
from engine.config import RunConfig  # noqa: E402
from engine.data import make_dose_response, prepare  # noqa: E402
from engine.data.contexts import map_contexts  # noqa: E402
from engine.metrics.distances import MMD_GAMMAS, mmd  # noqa: E402
from engine.train.stack import new_solver, stack_data  # noqa: E402

CASES = {"one_context": 1, "all_contexts": 0}


def run_case(per_step: int, args: argparse.Namespace) -> dict[str, Any]:
    config = RunConfig.resolve(
        dataset="synthetic", condition_key="dose", control="0", solver="condot", holdout=["dose", "1000"],
        context_keys=["dose"], embeddings=["dose=log"], steps=args.steps, seed=0,
        solver_params={"init": args.init, "lr": args.lr, "contexts_per_step": per_step},
    )
    prepared = prepare(make_dose_response(dim=args.dim, n_cells=args.cells, seed=0), config.data)
    device = torch.device("cpu")
    data = stack_data(prepared, prepared.maps, config, device)
    solver = new_solver(config, data, device)
    plan = solver.plan(solver.config, args.steps)
    solver.start_training(plan)
    controls = torch.from_numpy(prepared.cells(None, "0", "test").copy())
    contexts = torch.from_numpy(map_contexts(prepared, prepared.maps))
    targets = [torch.from_numpy(prepared.cells(None, k.perturbation, "test").copy()) for k in prepared.maps]
    held_out = [k.perturbation for k in prepared.maps].index("1000")

    def score(step: int, seconds: float) -> dict[str, float]:
        moved = solver.transport(controls.expand(len(targets), -1, -1), contexts).cells
        values = [float(mmd(moved[k], targets[k], MMD_GAMMAS)) for k in range(len(targets))]
        seen = [v for k, v in enumerate(values) if k != held_out]
        return {"step": step, "train_seconds": seconds, "seen_mmd": sum(seen) / len(seen), "held_out_mmd": values[held_out]}

    history, seconds = [score(0, 0.0)], 0.0
    for step in range(plan.total):
        started = time.perf_counter()
        solver.train_step(data, step, plan.phase_at(step))
        seconds += time.perf_counter() - started
        if (step + 1) % args.every == 0 or step + 1 == plan.total:
            history.append(score(step + 1, seconds))
    return {"contexts_per_step": per_step, "steps_per_second": plan.total / seconds, "final": history[-1],
            "history": history}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--dim", type=int, default=5)
    parser.add_argument("--cells", type=int, default=1000, help="cells per dose and of the control")
    parser.add_argument("--init", choices=("identity", "gaussian"), default="identity")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam lr (the paper: 1e-4)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="60 steps, evaluated every 20")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.every = 60, 20
    torch.set_num_threads(args.threads)
    cases = {name: run_case(per_step, args) for name, per_step in CASES.items()}
    target = 1.1 * min(c["final"]["seen_mmd"] for c in cases.values())
    for case in cases.values():
        reached = [h["train_seconds"] for h in case["history"] if h["seen_mmd"] <= target]
        case["seconds_to_target"] = reached[0] if reached else None
    doc = {"benchmark": "condot", "device": describe_device(torch.device("cpu"), args.threads),
           "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"target_seen_mmd": target}, "cases": cases}
    return emit(doc, args.out)


if __name__ == "__main__":
    main()
