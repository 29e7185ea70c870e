"""Issue 11's acceptance on BCR-XL: tune CellOT on three donors, then train the other donors with the
winner and with the defaults at the same step budget, scored on their test cells.

    python benchmarks/tune_bcrxl.py [--samples 16] [--steps 1000] [--out FILE.json]

Data: ../shared/data/catalyst_bodenmiller_bcrxl/bcrxl_16samples.h5ad (8 donors x (Ref, BCRXL), 24
markers, arcsinh(x/5) already in X), one map per donor (`--split-by patient_id`).
1. `perturbot tune --only-groups <tuning donors>` (default the first three): `--samples` trials, ASHA,
   `--max-concurrent` at once, `--steps` per trial, an evaluation every `--eval-every` steps.
2. `perturbot train --config best.yaml --only-groups <the other donors>`, and the same donors with the
   default CellOT config (`--steps`, `--eval-every` the same), `--seeds` training seeds each (the
   cell splits stay those of data seed 0, so every run is scored on the same test cells).
3. Per donor, the test `mmd` (6 gammas) of both models beside identity, observed, mean_shift and
   gaussian (the Bures map fitted on the donor's training cells), means over the seeds; the baselines
   are checked equal in both runs of a seed (same cells, same subsamples).
Work (the search and the runs) stays under --work (default benchmarks/out/tune_bcrxl/, replaced unless
`--reuse`, which keeps the finished search and runs there and runs only what is missing); wall times
come from the store (each run's created_at to finished_at).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import emit  # noqa: E402
from engine.api import FitResult  # noqa: E402
from engine.config import RunConfig  # noqa: E402
from engine.cli import main as perturbot  # noqa: E402
from engine.data import PreparedData, read_h5ad  # noqa: E402
from engine.solvers import build_solver  # noqa: E402
from engine.store import Store  # noqa: E402
from engine.train.loop import validation_mmd  # noqa: E402
from engine.train.stack import stack_data  # noqa: E402
from tune.results import leaderboard  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "catalyst_bodenmiller_bcrxl" / "bcrxl_16samples.h5ad"
CONDITION, CONTROL, DONOR = "condition", "Ref", "patient_id"
BASELINES = ("identity", "observed", "mean_shift", "gaussian")


def _run(argv: list[str], log: Any) -> None:
    """Run a perturbot command in this process (its messages to stderr)."""
    log("perturbot " + " ".join(argv))
    with contextlib.redirect_stdout(sys.stderr):
        code = perturbot(argv)
    if code != 0:
        raise SystemExit(f"perturbot {argv[0]} exited {code}")


def wall_seconds(directory: Path) -> float:
    """A run's (or search's) wall time, from its runs row in the store (created_at to finished_at)."""
    info = json.loads((directory / "run.json").read_text())
    with Store(info["store"]) as store:
        run = store.runs().set_index("run_id").loc[info["run_id"]]
    return (pd.Timestamp(run["finished_at"]) - pd.Timestamp(run["created_at"])).total_seconds()


def bures_valid_mmd(search: Path) -> float:
    """The Bures (gaussian) map's mean validation mmd over the search's tuning maps: the same cells and
    score as a trial's report, for one state (a trial's best_mmd is the best of its reports)."""
    config = RunConfig.load(search / "config.yaml")
    prepared = PreparedData.load(search / "data")
    data = stack_data(prepared, prepared.maps, config, torch.device("cpu"))
    bures = build_solver("gaussian", len(prepared.maps), data.dim)
    bures.init_from_data(data)
    return float(validation_mmd(bures, data).double().mean())


def test_mmd(run: Path) -> dict[str, dict[str, float]]:
    """{donor: {model, identity, observed, mean_shift, gaussian}}: the run's final test mmd per map."""
    summary = FitResult.load(run).summary("mmd")
    return {str(row["perturbation"]).split("/")[0]: {c: float(row[c]) for c in ("model", *BASELINES)}
            for _, row in summary.iterrows()}


def _plain(value: Any) -> Any:
    """A numpy scalar of the leaderboard as a Python one (JSON)."""
    return value.item() if hasattr(value, "item") else value


def search_summary(search: Path) -> dict[str, Any]:
    """The search's leaderboard: trials by status, the best trial's score, ratio and options."""
    info = json.loads((search / "run.json").read_text())
    with Store(info["store"]) as store:
        board, identity = leaderboard(store, info["run_id"])
    params = [c for c in board.columns if "." in c]
    best = board.iloc[0]
    return {
        "run_id": info["run_id"],
        "trials": {k: int(v) for k, v in board["status"].value_counts().items()},
        "identity_valid_mmd": identity,
        "bures_valid_mmd": bures_valid_mmd(search),
        "best": {"trial_id": best["trial_id"], "best_mmd": float(best["best_mmd"]), "ratio": float(best["ratio"]),
                 "params": {c: _plain(best[c]) for c in params}},
        "leaderboard": [{"trial_id": r["trial_id"], "status": r["status"], "step": int(r["step"]),
                         "best_mmd": float(r["best_mmd"]), **{c: _plain(r[c]) for c in params}}
                        for _, r in board.iterrows()],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--tune-donors", help="comma-separated donors to tune on (default: the first three)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--seeds", default="0", help="comma-separated training seeds of both runs (default 0)")
    p.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "out" / "tune_bcrxl")
    p.add_argument("--reuse", action="store_true",
                   help="keep the search and runs that --work already holds; run only what is missing")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if not args.data.is_file():
        raise SystemExit(f"{args.data} is absent (the shared datasets beside the repository)")
    donors = sorted(map(str, read_h5ad(args.data).obs[DONOR].unique()))
    tuning = args.tune_donors.split(",") if args.tune_donors else donors[:3]
    held = [d for d in donors if d not in tuning]
    seeds = [int(s) for s in args.seeds.split(",")]
    data = ["--data", str(args.data), "--condition-key", CONDITION, "--control", CONTROL, "--split-by", DONOR]
    budget = ["--steps", str(args.steps), "--set", f"train.eval_every={args.eval_every}"]
    if not args.reuse:
        shutil.rmtree(args.work, ignore_errors=True)

    def missing(directory: Path) -> bool:
        if (directory / "run.json").exists():
            return False
        shutil.rmtree(directory, ignore_errors=True)  # an unfinished attempt
        return True

    search = args.work / "search"
    if missing(search):
        _run(["tune", *data, "--only-groups", ",".join(tuning), "--solver", "cellot", "--samples", str(args.samples),
              "--scheduler", "asha", "--max-concurrent", str(args.max_concurrent), *budget, "--out", str(search)], log)
    wall = {"search": wall_seconds(search)}
    runs: dict[str, dict[int, dict[str, dict[str, float]]]] = {"tuned": {}, "default": {}}
    for seed in seeds:
        for name, command in (("tuned", ["--config", str(search / "best.yaml")]), ("default", [*data, "--solver", "cellot"])):
            out = args.work / f"{name}-seed{seed}"
            if missing(out):
                _run(["train", *command, "--only-groups", ",".join(held), *budget, "--set", f"train.seed={seed}",
                      "--out", str(out)], log)
            wall[f"train_{name}_seed{seed}"] = wall_seconds(out)
            runs[name][seed] = test_mmd(out)

    per_donor = {}
    for donor in held:
        for seed in seeds:  # the same test cells and subsamples: the baselines agree
            tuned, default = runs["tuned"][seed][donor], runs["default"][seed][donor]
            if any(abs(tuned[b] - default[b]) > 1e-6 for b in BASELINES):
                raise SystemExit(f"{donor}, seed {seed}: the baselines differ between the two runs")
        per_donor[donor] = {
            **{n: statistics.mean(runs[n][s][donor]["model"] for s in seeds) for n in runs},
            **{b: statistics.mean(runs["default"][s][donor][b] for s in seeds) for b in BASELINES},
            "per_seed": {n: [runs[n][s][donor]["model"] for s in seeds] for n in runs},
        }
    columns = ("tuned", "default", *BASELINES)
    mean = {c: statistics.mean(per_donor[d][c] for d in held) for c in columns}
    doc = {
        "benchmark": "tune_bcrxl",
        "config": {"data": str(args.data), "tuning_donors": tuning, "evaluated_donors": held, "solver": "cellot",
                   "samples": args.samples, "scheduler": "asha", "max_concurrent": args.max_concurrent,
                   "steps": args.steps, "eval_every": args.eval_every, "seeds": seeds, "metric": "test mmd (6 gammas)"},
        "search": search_summary(search),
        "wall_seconds": wall,
        "per_donor": per_donor,
        "mean": mean,
        "ratios": {"tuned_to_default": mean["tuned"] / mean["default"], "tuned_to_gaussian": mean["tuned"] / mean["gaussian"],
                   "default_to_gaussian": mean["default"] / mean["gaussian"],
                   "tuned_to_identity": mean["tuned"] / mean["identity"]},
        "tuned_wins": sum(per_donor[d]["tuned"] < per_donor[d]["default"] for d in held),
    }
    return emit(doc, args.out)


if __name__ == "__main__":
    main()
