"""NubOT against CellOT on BCR-XL per donor: weighted mmd, wall time, predicted weight per population.

    python benchmarks/nubot_bcrxl.py --out benchmarks/out/nubot_bcrxl.json            # 1000 steps each
    python benchmarks/nubot_bcrxl.py --steps 200 --work /tmp/bcrxl                     # quicker
    python benchmarks/nubot_bcrxl.py --reuse --work /tmp/bcrxl                         # re-read finished runs

Data: ../shared/data/catalyst_bodenmiller_bcrxl/bcrxl_16samples.h5ad (Bodenmiller 2012, 24 CyTOF
markers, arcsinh(x / 5); 8 donors x {Ref, BCRXL}). One map per donor (`--split-by patient_id`,
control Ref), the same steps, seed and one Ray worker for both solvers, every other setting the
default. Each solver's final test `mmd` (NubOT's also weighted by its predicted weights:
`mmd_weighted`) per donor beside identity and the Bures map.

Populations: each cell is called from its type markers (arcsinh scale, threshold POSITIVE = 2):
T (CD3+), B (CD3- CD20+), myeloid (CD3- CD20- and CD33+ or CD14+), NK (CD3- CD20- not myeloid,
CD7+), other. BCR-XL is a 30-minute stimulation: no population should grow or die, so NubOT's
weights should stay near 1. Reported per donor and population: the test controls' count, NubOT's
mean predicted weight (weights normalised to mean 1 over the donor's test controls) and the share
ratio BCRXL / Ref of the population called the same way in both conditions. That ratio is not a
growth factor here: the stimulation itself lowers CD20 and CD4 (cells with CD20 > 2: 18% of Ref,
6% of BCRXL), so B cells leave the B gate without dying.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np

if __package__ in (None, ""):  # run as a script from a checkout: make `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import emit  # noqa: E402
from engine.api import FitResult  # noqa: E402
from engine.cli import main as perturbot  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "catalyst_bodenmiller_bcrxl" / "bcrxl_16samples.h5ad"
SOLVERS = ("nubot", "cellot")
POSITIVE = 2.0  # arcsinh(x / 5) threshold of a positive type marker
POPULATIONS = ("T", "B", "myeloid", "NK", "other")


def call_populations(adata: ad.AnnData) -> np.ndarray:
    """A population label per cell from the type markers (see the module docstring)."""
    marker = {name: adata.X[:, i] > POSITIVE for i, name in enumerate(adata.var["antigen"])}
    myeloid = marker["CD33"] | marker["CD14"]
    return np.select(
        [marker["CD3"], marker["CD20"], myeloid, marker["CD7"]], ["T", "B", "myeloid", "NK"], default="other"
    ).astype(object)


def train(solver: str, args: argparse.Namespace) -> tuple[FitResult, float | None]:
    """Train (or, with --reuse, re-read) one solver's run; its wall seconds (None when re-read)."""
    run_dir = args.work / solver
    if args.reuse and (run_dir / "predictions.h5ad").exists():
        return FitResult.load(run_dir), None
    argv = ["train", "--data", str(args.data), "--condition-key", "condition", "--control", "Ref",
            "--split-by", "patient_id", "--solver", solver, "--steps", str(args.steps), "--workers", "1",
            "--seed", str(args.seed), "--out", str(run_dir)]
    started = time.perf_counter()
    if perturbot(argv) != 0:
        raise SystemExit(f"perturbot train --solver {solver} failed")
    return FitResult.load(run_dir), time.perf_counter() - started


def per_donor(result: FitResult, metric: str) -> dict[str, dict[str, float]]:
    """{donor: {model, identity, gaussian, ...}} of one metric's final test rows."""
    table = result.summary(metric)
    return {str(row["perturbation"]): {k: float(v) for k, v in row.items() if k not in ("perturbation", "metric")}
            for _, row in table.iterrows()}


def population_weights(result: FitResult, adata: ad.AnnData, populations: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per donor and population: test controls, observed share ratio BCRXL / Ref, mean predicted weight."""
    predicted = ad.read_h5ad(result.run_dir / "predictions.h5ad")
    position = {name: i for i, name in enumerate(adata.obs_names)}
    donors, condition = adata.obs["patient_id"].astype(str).to_numpy(), adata.obs["condition"].astype(str).to_numpy()
    predicted_donors = predicted.obs["group"].astype(str)
    out: dict[str, dict[str, Any]] = {}
    for donor in sorted(predicted_donors.unique()):
        rows = predicted.obs[predicted_donors == donor]
        called = populations[[position[c] for c in rows["source_cell"]]]
        weights = rows["weight"].to_numpy(dtype=float)
        weights = weights / weights.mean()
        cells = donors == donor
        share = {c: np.array([np.sum(populations[cells & (condition == c)] == pop) for pop in POPULATIONS])
                 for c in ("Ref", "BCRXL")}
        out[donor] = {}
        for pop in POPULATIONS:
            mine = called == pop
            if not mine.any():
                continue
            index = POPULATIONS.index(pop)
            ref, stim = share["Ref"][index] / share["Ref"].sum(), share["BCRXL"][index] / share["BCRXL"].sum()
            out[donor][pop] = {"test_controls": int(mine.sum()), "observed_share_ratio": stim / ref if ref > 0 else None,
                               "nubot_mean_weight": float(weights[mine].mean())}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/nubot_bcrxl"), help="run directories")
    parser.add_argument("--reuse", action="store_true", help="re-read runs already in --work instead of training")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found (the shared BCR-XL file; see ../shared/data)")
    runs = {solver: train(solver, args) for solver in SOLVERS}
    nubot = runs["nubot"][0]
    adata = ad.read_h5ad(args.data)
    donors: dict[str, Any] = {}
    for solver, (result, _) in runs.items():
        for donor, row in per_donor(result, "mmd").items():
            donors.setdefault(donor, {})[f"{solver}_mmd"] = row
    for donor, row in per_donor(nubot, "mmd_weighted").items():
        donors[donor]["nubot_mmd_weighted"] = row
    doc = {"benchmark": "nubot_bcrxl", "settings": {"steps": args.steps, "seed": args.seed, "data": str(args.data)},
           "wall_seconds": {solver: seconds for solver, (_, seconds) in runs.items()},
           "per_donor": donors, "populations": population_weights(nubot, adata, call_populations(adata))}
    return emit(doc, args.out)


if __name__ == "__main__":
    main()
