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
Work (the search and the runs) stays under --work (default benchmarks/out/tune_bcrxl/, replaced);
`--search DIR` trains with a finished search's best.yaml instead of running one (its settings).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import emit  # noqa: E402
from engine.api import FitResult  # noqa: E402
from engine.config import RunConfig  # noqa: E402
from engine.cli import main as perturbot  # noqa: E402
from engine.data import read_h5ad  # noqa: E402
from engine.store import Store  # noqa: E402
from tune.results import leaderboard  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "catalyst_bodenmiller_bcrxl" / "bcrxl_16samples.h5ad"
CONDITION, CONTROL, DONOR, STIMULUS = "condition", "Ref", "patient_id", "BCRXL"
BASELINES = ("identity", "observed", "mean_shift", "gaussian")


def _run(argv: list[str], log: Any) -> float:
    """Run a perturbot command in this process (its messages to stderr); its wall seconds."""
    log("perturbot " + " ".join(argv))
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        code = perturbot(argv)
    if code != 0:
        raise SystemExit(f"perturbot {argv[0]} exited {code}")
    return time.perf_counter() - started


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
        run = store.runs().set_index("run_id").loc[info["run_id"]]
    params = [c for c in board.columns if "." in c]
    best = board.iloc[0]
    return {
        "run_id": info["run_id"],
        "trials": {k: int(v) for k, v in board["status"].value_counts().items()},
        "wall_s_in_store": (pd.Timestamp(run["finished_at"]) - pd.Timestamp(run["created_at"])).total_seconds(),
        "identity_valid_mmd": identity,
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
    p.add_argument("--search", type=Path, help="a finished search to use instead of running one (its tuning donors, "
                                               "steps and eval period; its wall time from the store)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if not args.data.is_file():
        raise SystemExit(f"{args.data} is absent (the shared datasets beside the repository)")
    donors = sorted(map(str, read_h5ad(args.data).obs[DONOR].unique()))
    tuning = args.tune_donors.split(",") if args.tune_donors else donors[:3]
    if args.search is not None:  # its settings, not the flags'
        searched = RunConfig.load(args.search / "config.yaml")
        tuning, args.steps, args.eval_every = list(searched.data.groups), searched.train.steps, searched.train.eval_every
        args.samples = yaml.safe_load((args.search / "search.yaml").read_text())["samples"]
    held = [d for d in donors if d not in tuning]
    seeds = [int(s) for s in args.seeds.split(",")]
    data = ["--data", str(args.data), "--condition-key", CONDITION, "--control", CONTROL, "--split-by", DONOR]
    budget = ["--steps", str(args.steps), "--set", f"train.eval_every={args.eval_every}"]

    wall: dict[str, float] = {}
    search = args.search or args.work / "search"
    if args.search is None:
        shutil.rmtree(args.work, ignore_errors=True)
        wall["search_s"] = _run(["tune", *data, "--only-groups", ",".join(tuning), "--solver", "cellot",
                                 "--samples", str(args.samples), "--scheduler", "asha",
                                 "--max-concurrent", str(args.max_concurrent), *budget, "--out", str(search)], log)
    runs: dict[str, dict[int, dict[str, dict[str, float]]]] = {"tuned": {}, "default": {}}
    for seed in seeds:
        seed_set = ["--set", f"train.seed={seed}"]
        for name, command in (("tuned", ["--config", str(search / "best.yaml")]), ("default", [*data, "--solver", "cellot"])):
            out = args.work / f"{name}-seed{seed}"
            shutil.rmtree(out, ignore_errors=True)
            wall[f"train_{name}_seed{seed}_s"] = _run(["train", *command, "--only-groups", ",".join(held), *budget,
                                                       *seed_set, "--out", str(out)], log)
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
