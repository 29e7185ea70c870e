"""CondOT on the Papalexi CRISPR screen: knockouts held out under the mode-of-action embedding, against
identity, the closed-form baselines and per-knockout CellOT maps.

    python benchmarks/condot_papalexi.py --out benchmarks/out/condot_papalexi.json     # 2000 steps each
    python benchmarks/condot_papalexi.py --steps 100 --work /tmp/papalexi               # a timing run
    python benchmarks/condot_papalexi.py --reuse --variant lr1e-3 solver.lr=1e-3        # one more CondOT run

Data: ../shared/data/sceptre_papalexi2021_lowmoi/papalexi_lowmoi.h5ad (Papalexi 2021, THP-1 cells, 26
knockouts, 299 genes, raw counts), condition obs.grna_target, control non-targeting,
`--preprocess log1p_normalize --embed pca:50` (as jobs/specs/papalexi.yaml). Two runs through the
CLI, one Ray worker each, the same seed:
- condot: `--solver condot --context-keys grna_target --embedding grna_target=moa --holdout
  grna_target=<--held-out>`: one model over the 19 seen knockouts; the held-out ones are unseen
  contexts (placed by moa from their own cells), evaluated on all their cells;
- cellot: `--solver cellot`, one map per knockout (no holdout): every seen knockout and the control
  have exactly the CondOT run's train / valid / test cells (splits are drawn per (group, condition),
  tests/test_condot.py checks it); a held-out knockout is split 70/10/20 here, so CellOT trained on
  70% of it: an oracle for those.
`--variant NAME SET...` adds a CondOT run with `--set` overrides (a fix tried when CondOT loses).

Reported per knockout: each run's final test rows from the store (`mmd`, `r2_means`, `l2_means`:
model, identity, observed, mean_shift, gaussian; in the run's metric space, the knockout's 50 marker
genes of the decoded cells; a held-out knockout's markers and baselines in the CondOT run are those
of the pooled maps and of the nearest seen knockout, and its cells all its cells), and `latent`: the
mmd (6 gammas) in the CondOT run's PCA-50 space, on the same cells for every model: the test
controls (the same in both runs) and the CellOT run's test cells of the knockout (never trained on
by either), beside identity (the test controls), observed (the knockout's CellOT-split train cells),
the Bures map fitted on those train cells (`gaussian`; for a held-out knockout an oracle) and, for a
held-out knockout, the Bures map of the seen knockout nearest in moa (`gaussian_nearest`: CondOT's
start). The CellOT run's PCA was fitted with the held-out knockouts' train cells too: its
predictions are moved into CondOT's coordinates by the linear map between the two PCA bases.
Why both: decoded cells lie in the PCA subspace, the identity's controls do not, so in the metric
space every map carries a reconstruction floor that identity is spared.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script from a checkout: make `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import emit  # noqa: E402
from engine.api import FitResult  # noqa: E402
from engine.cli import main as perturbot  # noqa: E402
from engine.data import PreparedData  # noqa: E402
from engine.metrics.distances import MMD_GAMMAS, mmd  # noqa: E402
from engine.ot.gaussian import bures_map, gaussian_moments  # noqa: E402
from engine.train.saved_maps import SavedMaps, predict_cells  # noqa: E402
from engine.train.stack import nearest_trained  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sceptre_papalexi2021_lowmoi" / "papalexi_lowmoi.h5ad"
KEY, CONTROL = "grna_target", "non-targeting"
HELD_OUT = "IFNGR2,JAK2,STAT1,SMAD4,CUL3,ATF2"
METRICS = ("mmd", "r2_means", "l2_means")


def train(name: str, extra: list[str], args: argparse.Namespace) -> tuple[FitResult, float | None]:
    """Train (or, with --reuse, re-read) one run; its wall seconds (None when re-read)."""
    run_dir = args.work / name
    if args.reuse and (run_dir / "predictions.h5ad").exists():
        return FitResult.load(run_dir), None
    argv = ["train", "--data", str(args.data), "--condition-key", KEY, "--control", CONTROL, "--preprocess",
            "log1p_normalize", "--embed", "pca:50", "--steps", str(args.steps), "--workers", "1",
            "--seed", str(args.seed), "--out", str(run_dir), *extra]
    print(f"perturbot {' '.join(argv)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    if perturbot(argv) != 0:
        raise SystemExit(f"perturbot train ({name}) failed")
    return FitResult.load(run_dir), time.perf_counter() - started


def store_rows(result: FitResult) -> dict[str, dict[str, dict[str, float]]]:
    """{knockout: {metric: {model, identity, observed, mean_shift, gaussian}}} of the final test rows."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for metric in METRICS:
        for _, row in result.summary(metric).iterrows():
            values = {k: float(v) for k, v in row.items() if k not in ("perturbation", "metric")}
            out.setdefault(str(row["perturbation"]), {})[metric] = values
    return out


def latent_predictions(result: FitResult, controls: np.ndarray) -> dict[str, np.ndarray]:
    """Every map of a run applied to the same controls, in the training (PCA) space: {knockout: cells}."""
    out = {}
    for path in result.dir.saved_maps():
        saved = SavedMaps(path)
        moved = predict_cells(saved.solver, [controls] * len(saved.names), saved.device, saved.contexts)
        out |= {name: cells for name, (cells, _) in zip(saved.names, moved)}
    return out


def bures(source: np.ndarray, target: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """`cells` through the Bures map between Gaussian fits of source and target (float64)."""
    fits = [gaussian_moments(torch.from_numpy(np.asarray(a, np.float64))) for a in (source, target)]
    a, b = bures_map(*fits[0], *fits[1])
    return (torch.from_numpy(np.asarray(cells, np.float64)) @ a + b).numpy()


def to_space(cells: np.ndarray, source: PreparedData, space: PreparedData) -> np.ndarray:
    """Latent cells of one run in another run's PCA coordinates: (z C_s + mu_s - mu) C^T (linear, unclamped)."""
    a, b = source.embedding, space.embedding
    return ((cells @ a.components + a.mean - b.mean) @ b.components.T).astype(np.float32)


def by_name(prepared: PreparedData, condition: str, names: list[str]) -> np.ndarray:
    """Latent cells of a condition picked by obs name, whatever split they are in."""
    splits = prepared.spec.splits
    row = {n: (s, i) for s in splits for i, n in enumerate(prepared.cell_names(None, condition, s))}
    cells = {s: prepared.cells(None, condition, s) for s in splits}
    return np.stack([cells[row[n][0]][row[n][1]] for n in names])


def latent_table(condot: dict[str, FitResult], cellot: FitResult, held_out: list[str]) -> dict[str, dict[str, Any]]:
    """Per knockout: mmd in the CondOT run's PCA space of every model and baseline on the same cells
    (module docstring); CellOT's predictions moved there from its own PCA (fitted with the held-out cells)."""
    own = PreparedData.load(cellot.dir.data)
    space = PreparedData.load(next(iter(condot.values())).dir.data)  # variants change the solver only
    if own.cell_names(None, CONTROL, "test") != space.cell_names(None, CONTROL, "test"):
        raise SystemExit("the CondOT and CellOT runs have different test controls")
    controls, control_train = space.cells(None, CONTROL, "test"), space.cells(None, CONTROL, "train")
    predicted = {name: latent_predictions(result, controls) for name, result in condot.items()}
    predicted["cellot"] = {k: to_space(cells, own, space) for k, cells in
                           latent_predictions(cellot, own.cells(None, CONTROL, "test")).items()}
    nearest = dict(zip(space.maps, nearest_trained(space, space.maps)))
    seen = [k for k in space.maps if space.has_training_cells(k)]

    def score(cells: np.ndarray, truth: np.ndarray) -> float:
        return float(mmd(torch.from_numpy(np.asarray(cells, np.float64)), torch.from_numpy(np.asarray(truth, np.float64)),
                         MMD_GAMMAS))

    out: dict[str, dict[str, Any]] = {}
    for key in space.maps:
        name = key.perturbation
        truth = by_name(space, name, own.cell_names(None, name, "test"))
        train = by_name(space, name, own.cell_names(None, name, "train"))
        row: dict[str, Any] = {run: score(cells[name], truth) for run, cells in predicted.items()}
        row |= {"identity": score(controls, truth), "observed": score(train, truth),
                "gaussian": score(bures(control_train, train, controls), truth)}
        if name in held_out:
            neighbour = seen[nearest[key]].perturbation
            row["gaussian_nearest"] = score(bures(control_train, space.cells(None, neighbour, "train"), controls), truth)
            row["nearest_seen"] = neighbour
        out[name] = row
    return out


def wins(per_knockout: dict[str, Any], held_out: list[str], run: str) -> dict[str, Any]:
    """How many knockouts (held out, seen) `run` beats each other column on, latent mmd and store mmd."""
    counts: dict[str, Any] = {}
    for group, names in (("held_out", held_out), ("seen", [k for k in per_knockout if k not in held_out])):
        latent = [per_knockout[k]["latent"] for k in names]
        others = [c for c in latent[0] if c != run and c != "nearest_seen"]
        counts[group] = {"knockouts": len(names),
                         "latent_beats": {c: sum(row[run] < row[c] for row in latent) for c in others}}
        store = [per_knockout[k]["store"][run]["mmd"] | ({} if group == "held_out" else  # same cells: comparable
                 {"cellot": per_knockout[k]["store"]["cellot"]["mmd"]["model"]}) for k in names]
        counts[group]["store_beats"] = {c: sum(row["model"] < row[c] for row in store) for c in store[0] if c != "model"}
    return counts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--held-out", default=HELD_OUT, help="knockouts held out of the CondOT run (comma-separated)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "SET"),
                        help="another CondOT run: a name and --set overrides (e.g. lr1e-3 solver.lr=1e-3)")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/condot_papalexi"), help="run directories")
    parser.add_argument("--reuse", action="store_true", help="re-read runs already in --work instead of training")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found (the shared Papalexi file; see ../shared/data)")
    held_out = [k.strip() for k in args.held_out.split(",") if k.strip()]
    condot_flags = ["--solver", "condot", "--context-keys", KEY, "--embedding", f"{KEY}=moa",
                    "--holdout", f"{KEY}={','.join(held_out)}"]
    runs = {"condot": train("condot", condot_flags, args), "cellot": train("cellot", ["--solver", "cellot"], args)}
    for name, *sets in args.variant:
        runs[f"condot_{name}"] = train(f"condot_{name}", condot_flags + [x for s in sets for x in ("--set", s)], args)
    results = {name: result for name, (result, _) in runs.items()}
    store = {name: store_rows(result) for name, result in results.items()}
    for name in results:  # seen knockouts: the same test cells and markers, so the same baselines
        for knockout, rows in store[name].items():
            if knockout not in held_out and rows["mmd"]["identity"] != store["cellot"][knockout]["mmd"]["identity"]:
                raise SystemExit(f"{name} and cellot score {knockout} on different cells")
    condot_runs = {name: r for name, r in results.items() if name != "cellot"}
    latent = latent_table(condot_runs, results["cellot"], held_out)
    per_knockout = {k: {"held_out": k in held_out, "store": {name: store[name][k] for name in results}, "latent": latent[k]}
                    for k in sorted(latent)}
    train_seconds = {name: float(r.metrics(metric="train_seconds")["value"].max()) for name, r in results.items()}
    effects = {k: {"identity": v["store"]["cellot"]["mmd"]["identity"], "observed": v["store"]["cellot"]["mmd"]["observed"]}
               for k, v in per_knockout.items()}
    doc = {"benchmark": "condot_papalexi",
           "settings": {"steps": args.steps, "seed": args.seed, "held_out": held_out, "data": str(args.data),
                        "preprocess": "log1p_normalize", "embed": "pca:50", "workers": 1,
                        "variants": {f"condot_{name}": sets for name, *sets in args.variant}},
           "wall_seconds": {name: seconds for name, (_, seconds) in runs.items()}, "train_seconds": train_seconds,
           "effects": effects, "per_knockout": per_knockout,
           "wins": {name: wins(per_knockout, held_out, name) for name in condot_runs}}
    return emit(doc, args.out)


if __name__ == "__main__":
    main()
