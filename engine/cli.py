"""`perturbot`: train, demo, predict, evaluate, runs, metrics, bench.

Errors are one line on stderr: exit code 2 for bad input (data, options), 1 for a failed run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence


from engine.data import DataError
from engine.data.spec import PREPROCESSING, SELECT_ON
from engine.rundir import RunDir, default_run_dir
from engine.solvers import SOLVERS

DEMO_STEPS = 1000  # the demo's default budget (a few minutes on a laptop CPU); --steps overrides


class Progress:
    """One self-overwriting status line on stderr for long training runs."""

    def __init__(self, label: str) -> None:
        self.label, self.started, self.last = label, time.perf_counter(), 0.0

    def __call__(self, done: int, total: int, stacks_done: int, stacks: int) -> None:
        now = time.perf_counter()
        if now - self.last < (1.0 if sys.stderr.isatty() else 15.0) and done < total:
            return
        self.last = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f", eta {int((total - done) / rate)}s" if 0 < done < total and rate > 0 else ""
        percent = 100 * done / total if total else 100.0
        end = "\r" if sys.stderr.isatty() else "\n"
        print(f"{self.label}: {done}/{total} steps ({percent:.0f}%), {stacks_done}/{stacks} stacks done, "
              f"{elapsed:.0f}s{eta}   ", end=end, file=sys.stderr, flush=True)


def _train_args(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    if data_required:
        p.add_argument("--data", required=True, help="input .h5ad (dense or sparse X, or --obsm-key)")
        p.add_argument("--condition-key", required=True, help="obs column holding the condition labels")
        p.add_argument("--control", required=True, help="control label in that column")
        p.add_argument("--perturbations", default="all", help="'all' or a comma-separated list of labels")
    p.add_argument("--solver", choices=sorted(SOLVERS),
                   help="default: the config file's solver.name, else cellot. " + "; ".join(
                       f"{name} = {cls.summary()}" for name, cls in sorted(SOLVERS.items())))
    p.add_argument("--config", type=Path, help="YAML with sections data, solver, train, cluster")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. train.batch_size=128 or solver.init=uniform")
    p.add_argument("--out", type=Path, help="run directory (default runs/<time>)")
    p.add_argument("--store", help="SQLAlchemy URL of the metrics store (default sqlite in the run dir)")
    p.add_argument("--address", default=None, help="local (default, in-process Ray) | auto | ray://host:port")
    p.add_argument("--workers", type=int, help="Ray Train workers (each owns whole maps)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (fractions allowed; 0 = CPU)")
    p.add_argument("--split-by", help="obs key: one map per (group, perturbation), controls from the same group")
    p.add_argument("--holdout", metavar="KEY=VALUE", help="cells with obs[KEY]==VALUE form the test split (o.o.s.); "
                   "with --context-keys a context whose cells are all held out is not trained on, only evaluated")
    p.add_argument("--context-keys", metavar="KEY[,KEY]",
                   help="condot: what the map is conditioned on, the condition key and/or the split-by key")
    p.add_argument("--embedding", action="append", default=[], metavar="KEY=onehot|value|log",
                   help="embedding of a context key (default onehot; 'A+B' labels are multi-hot); value: the "
                        "label as a number, scaled; log: log10 of it, scaled")
    p.add_argument("--preprocess", choices=PREPROCESSING, help="default none")
    p.add_argument("--embed", help="train in a latent space, e.g. pca:50 (metrics decoded to genes)")
    p.add_argument("--obsm-key", help="take features from adata.obsm[KEY] instead of X")
    p.add_argument("--select-on", choices=SELECT_ON,
                   help="cells that pick each map's best state: valid (default, a split of its own) or "
                        "test (CellOT's protocol, for paper comparisons; the final metrics then see them too)")
    p.add_argument("--seed", type=int, help="seed of splits, initialisation and minibatches (default 0)")
    p.add_argument("--steps", type=int, help="outer training steps per map, all phases (default 2000)")
    p.add_argument("--device", help="auto (default: a GPU per worker when Ray has GPUs) | cpu | cuda | cuda:N")
    p.add_argument("--published", action="store_true",
                   help="the paper's exact method: its constants and step count (CellOT: min-max, uniform init, "
                        "lr 1e-4, 100k steps); --steps and --set still apply")


def _key_value(item: str, option: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise DataError(f"{option} expects KEY=VALUE, got {item!r}")
    return key, value


def _resolve_config(args: argparse.Namespace, dataset: str, condition_key: str | None, control: str | None,
                    perturbations: str | None, split_by: str | None) -> Any:
    from engine.config import RunConfig

    holdout = list(_key_value(args.holdout, "--holdout")) if args.holdout else None
    wanted = None if perturbations in (None, "all") else [p.strip() for p in perturbations.split(",") if p.strip()]
    return RunConfig.resolve(
        args.config, args.set, dataset=dataset, condition_key=condition_key, control=control,
        perturbations=wanted, split_by=split_by, holdout=holdout, preprocess=args.preprocess, embed=args.embed,
        obsm_key=args.obsm_key, select_on=args.select_on, seed=args.seed, solver=args.solver,
        context_keys=[k.strip() for k in args.context_keys.split(",") if k.strip()] if args.context_keys else None,
        embeddings=args.embedding or None,
        published=args.published or None, steps=args.steps, device=args.device,
        address=args.address, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
    )


def _run(config: Any, out: Path | None, store: str | None) -> int:
    from engine.api import run

    run_dir = out or default_run_dir()
    result = run(config, run_dir, store, on_progress=Progress(f"training {config.solver}"))
    print(file=sys.stderr)
    maps = result.maps()
    print(f"run {result.run_id}: {len(maps)} maps, "
          + ", ".join(f"{n} {s}" for s, n in maps["status"].value_counts().items()) + f" -> {run_dir}")
    for row in maps[maps["error"].notna()].itertuples():
        print(f"  {row.perturbation}: {row.status}: {row.error}", file=sys.stderr)
    _print_frame(result.summary(), "table")
    return 0 if result.succeeded() else 1


def cmd_train(args: argparse.Namespace) -> int:
    config = _resolve_config(args, str(args.data), args.condition_key, args.control, args.perturbations, args.split_by)
    return _run(config, args.out, args.store)


def cmd_demo(args: argparse.Namespace) -> int:
    from engine.data import make_synthetic

    out = args.out or default_run_dir("demo-")
    out.mkdir(parents=True, exist_ok=True)
    dataset = out / "synthetic.h5ad"
    make_synthetic(n_perturbations=4, n_groups=2, dim=10, n_cells=1000, seed=0).write_h5ad(dataset)
    print(f"synthetic data: 2 groups x 4 perturbations, 10 features -> {dataset}", file=sys.stderr)
    if args.steps is None and not args.published:
        args.steps = DEMO_STEPS
    if args.workers is None:
        args.workers = min(2, os.cpu_count() or 1)
    config = _resolve_config(args, str(dataset), "condition", "control", "all", args.split_by or "group")
    return _run(config, out, args.store)


def _open_run(run: str, store: str | None) -> Any:
    from engine.api import FitResult

    return FitResult.load(run, store)


def cmd_predict(args: argparse.Namespace) -> int:
    from engine.data import read_h5ad

    result = _open_run(args.run, args.store)
    wanted = [p.strip() for p in args.perturbations.split(",")] if args.perturbations else None
    context = None
    if args.context:
        context = dict(_key_value(item, "--context") for item in args.context)
    predicted = result.predict(read_h5ad(args.data), wanted, context)
    predicted.write_h5ad(args.out)
    print(f"{predicted.n_obs} predicted cells ({len(set(predicted.obs['perturbation']))} perturbations) -> {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    result = _open_run(args.run, args.store)
    rows = result.evaluate(bootstrap=args.bootstrap, markers=args.markers, sinkhorn=args.sinkhorn)
    print(f"{rows} metric rows written for run {result.run_id}")
    _print_frame(result.summary(), "table")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    import pandas as pd

    from engine.store import Store

    runs_found = [RunDir(p) for p in sorted(Path(args.root).glob("*"))]
    urls = [args.store] if args.store else [d.default_store for d in runs_found if d.has_default_store()]
    frames = []
    for url in urls:
        store = Store(url)
        frames.append(store.runs())
        store.close()
    if not frames or all(f.empty for f in frames):
        print("no runs found" + ("" if args.store else f" under {args.root}/ (use --store URL)"))
        return 0
    runs = pd.concat(frames)[["run_id", "kind", "solver", "dataset", "status", "created_at", "finished_at"]]
    print(runs.to_string(index=False))
    return 0


def _print_frame(frame: Any, fmt: str) -> None:
    if frame.empty:
        print("no metrics yet")
        return
    if fmt == "csv":
        print(frame.to_csv(index=False), end="")
    elif fmt == "json":
        print(frame.to_json(orient="records"))
    else:
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def cmd_metrics(args: argparse.Namespace) -> int:
    result = _open_run(args.run, args.store)
    _print_frame(result.metrics(metric=args.metric) if args.raw else result.summary(args.metric), args.format)
    return 0


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    """Run benchmarks/NAME.py from the checkout (`bench [NAME] [ARGS]`; NAME defaults to throughput)."""
    import runpy

    names = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    name = rest[0] if rest[:1] and rest[0] in names else "throughput"
    script = BENCHMARKS / f"{name}.py"
    if not script.exists():
        raise DataError(f"perturbot bench needs the project checkout ({script} is missing)")
    sys.argv = [str(script)] + rest[1 if rest[:1] == [name] else 0 :]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perturbot", description="Neural optimal-transport maps of single-cell perturbations, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one map per perturbation (per group) and evaluate it")
    _train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("demo", help=f"train on a shipped synthetic dataset (2 groups x 4 perturbations; "
                                    f"{DEMO_STEPS} steps and 2 workers unless set)")
    _train_args(p, data_required=False)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("predict", help="predict perturbed cells from control cells with a trained run")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--data", required=True, help=".h5ad of control cells (same features as training)")
    p.add_argument("--perturbations", help="comma-separated map names (default: all)")
    p.add_argument("--context", action="append", metavar="KEY=VALUE",
                   help="condot: predict this context instead of the run's maps (one per context key, e.g. "
                        "--context dose=3000; unseen values and 'A+B' combinations of seen parts work)")
    p.add_argument("--out", required=True, type=Path, help="output .h5ad")
    p.add_argument("--store")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("evaluate", help="re-evaluate a run's maps on held-out cells (bootstrap, markers)")
    p.add_argument("--run", required=True)
    p.add_argument("--bootstrap", type=int, default=10, help="random subsamples of 100..1500 cells (CellOT: 10)")
    p.add_argument("--markers", type=int, default=None, help="use the top-N marker features (<= those ranked)")
    p.add_argument("--sinkhorn", action="store_true", help="add the Sinkhorn divergence (eps 0.01 on 0.5|x-y|^2, as CondOT; several s per map)")
    p.add_argument("--store")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("runs", help="list runs in a store")
    p.add_argument("--store", help="SQLAlchemy URL (default: every runs/*/metrics.sqlite)")
    p.add_argument("--root", default="runs", help="where to look for run directories")
    p.set_defaults(func=cmd_runs)
    p = sub.add_parser("metrics", help="metrics of a run: per map, model vs identity, observed, mean_shift, gaussian")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--store")
    p.add_argument("--metric", help="only this metric")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--raw", action="store_true", help="every row (training logs, validation), not the summary")
    p.set_defaults(func=cmd_metrics)
    p = sub.add_parser("bench", add_help=False,
                       help="benchmarks (JSON out): stacked vs one-at-a-time (`bench --help`), 1 vs 2 Ray workers "
                            "(`bench workers`), data preparation (`bench data_prep`), W2 solvers against known maps "
                            "(`bench ground_truth`), per-iteration speed of the solvers (`bench solvers`), CondOT's "
                            "contexts per step (`bench condot`)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:
        return cmd_bench(argparse.Namespace(), [a for a in argv[1:] if a != "--"])
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DataError as error:
        print(f"perturbot: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("perturbot: interrupted", file=sys.stderr)
        return 1
    except Exception as error:  # a failed run: one line, the details are in the run directory / logs
        print(f"perturbot: run failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
