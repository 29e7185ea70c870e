"""`perturbot`: train, demo, tune, predict, evaluate, runs, metrics, bench.

Errors are one line on stderr: exit code 2 for bad input (data, options), 1 for a failed run.
"""
from __future__ import annotations

import argparse
import contextlib
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


def _data_args(p: argparse.ArgumentParser, perturbations_help: str, with_data: bool = True) -> None:
    if with_data:
        p.add_argument("--data", help="input .h5ad (dense or sparse X, or --obsm-key); or `dataset` in --config")
        p.add_argument("--condition-key", help="obs column holding the condition labels (or data.condition_key)")
        p.add_argument("--control", help="control label in that column (or data.control)")
        p.add_argument("--perturbations", help=perturbations_help)
    p.add_argument("--split-by", help="obs key: one map per (group, perturbation), controls from the same group")
    p.add_argument("--holdout", metavar="KEY=VALUE", help="cells with obs[KEY]==VALUE form the test split (o.o.s.)")
    p.add_argument("--preprocess", choices=PREPROCESSING, help="default none")
    p.add_argument("--embed", help="train in a latent space, e.g. pca:50 (metrics decoded to genes)")
    p.add_argument("--obsm-key", help="take features from adata.obsm[KEY] instead of X")
    p.add_argument("--select-on", choices=SELECT_ON,
                   help="cells that pick each map's best state: valid (default, a split of its own) or "
                        "test (CellOT's protocol, for paper comparisons; the final metrics then see them too)")
    p.add_argument("--seed", type=int, help="seed of splits, initialisation and minibatches (default 0)")


def _solver_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", choices=sorted(SOLVERS),
                   help="default: the config file's solver.name, else cellot. " + "; ".join(
                       f"{name} = {cls.summary()}" for name, cls in sorted(SOLVERS.items())))
    p.add_argument("--config", type=Path, help="YAML with sections dataset, data, solver, train, cluster")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. train.batch_size=128 or solver.init=uniform")
    p.add_argument("--store", help="SQLAlchemy URL of the metrics store (default sqlite in the run dir)")
    p.add_argument("--address", default=None, help="local (default, in-process Ray) | auto | ray://host:port")
    p.add_argument("--steps", type=int, help="outer training steps per map, all phases (default 2000)")
    p.add_argument("--published", action="store_true",
                   help="the paper's exact method: its constants and step count (CellOT: min-max, uniform init, "
                        "lr 1e-4, 100k steps); --steps and --set still apply")


def _train_args(p: argparse.ArgumentParser, with_data: bool = True) -> None:
    _data_args(p, "'all' (default) or a comma-separated list of labels", with_data)
    _solver_args(p)
    p.add_argument("--out", type=Path, help="run directory (default runs/<time>)")
    p.add_argument("--device", help="auto (default: a GPU per worker when Ray has GPUs) | cpu | cuda | cuda:N")
    p.add_argument("--workers", type=int, help="Ray Train workers (each owns whole maps)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (fractions allowed; 0 = CPU)")


def _resolve_config(args: argparse.Namespace, dataset: str, condition_key: str | None, control: str | None,
                    perturbations: str | None, split_by: str | None) -> Any:
    from engine.config import RunConfig

    holdout = None
    if args.holdout:
        key, sep, value = args.holdout.partition("=")
        if not sep:
            raise DataError(f"--holdout expects KEY=VALUE, got {args.holdout!r}")
        holdout = [key, value]
    wanted = None if perturbations in (None, "all") else [p.strip() for p in perturbations.split(",") if p.strip()]
    return RunConfig.resolve(
        args.config, args.set, dataset=dataset, condition_key=condition_key, control=control,
        perturbations=wanted, split_by=split_by, holdout=holdout, preprocess=args.preprocess, embed=args.embed,
        obsm_key=args.obsm_key, select_on=args.select_on, seed=args.seed, solver=args.solver,
        published=args.published or None, steps=args.steps, device=getattr(args, "device", None),
        address=args.address, workers=getattr(args, "workers", None),
        gpus_per_worker=getattr(args, "gpus_per_worker", None),
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


def _dataset(args: argparse.Namespace) -> str | None:
    return None if args.data is None else str(args.data)


def cmd_train(args: argparse.Namespace) -> int:
    config = _resolve_config(args, _dataset(args), args.condition_key, args.control, args.perturbations, args.split_by)
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


def cmd_tune(args: argparse.Namespace) -> int:
    from tune.search import SearchSettings, load_space, resume, start

    with contextlib.redirect_stdout(sys.stderr):  # Tune's own messages; stdout keeps the leaderboard
        if args.resume:
            if args.out is None or args.data is not None or args.config is not None:
                raise DataError("--resume continues the search in --out DIR with its own settings; give only --out")
            result = resume(args.out)
        else:
            config = _resolve_config(args, _dataset(args), args.condition_key, args.control, args.perturbations,
                                     args.split_by)
            settings = SearchSettings(load_space(config, args.space), args.samples, args.scheduler, args.search,
                                      args.max_concurrent, args.gpus_per_trial)
            result = start(config, settings, args.out or default_run_dir("tune-"), args.store)
    print(f"search {result.run_id} -> {result.dir.root}")
    print(result.describe(args.top))
    print(f"best config: {result.dir.best_config} (perturbot train --config {result.dir.best_config})")
    return 0


def _search(run: str, store: str | None) -> tuple[str, str] | None:
    """(store URL, run id) when `run` is a search: its directory, or its run id in --store."""
    from engine.store import Store

    directory = RunDir(run)
    if directory.exists():
        info = directory.read_info()
        return (store or info["store"], info["run_id"]) if info.get("kind") == "tune" else None
    if store is None:
        return None
    with Store(store) as opened:
        runs = opened.runs()
    kind = runs.loc[runs["run_id"] == run, "kind"]
    if kind.empty:
        raise DataError(f"no run {run!r} in the store {store}")
    if kind.iloc[0] != "tune":
        raise DataError(f"run {run} is a training run: give its run directory to --run")
    return store, run


def _open_run(run: str, store: str | None) -> Any:
    from engine.api import FitResult

    return FitResult.load(run, store)


def cmd_predict(args: argparse.Namespace) -> int:
    from engine.data import read_h5ad

    result = _open_run(args.run, args.store)
    wanted = [p.strip() for p in args.perturbations.split(",")] if args.perturbations else None
    predicted = result.predict(read_h5ad(args.data), wanted)
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
    search = _search(args.run, args.store)
    if search is not None:
        from engine.store import Store
        from tune.results import describe, leaderboard

        with Store(search[0]) as store:
            if args.raw:  # every trial's rows, and the identity's
                _print_frame(store.metrics(search[1], metric=args.metric), args.format)
                return 0
            board, identity = leaderboard(store, search[1])
        if args.format == "table":
            print(describe(board, identity, len(board)))
        else:
            _print_frame(board, args.format)
        return 0
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
    _train_args(p, with_data=False)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("tune", help="hyperparameter search with Ray Tune: leaderboard in the store, best config as YAML")
    _data_args(p, "the tuning subset: comma-separated perturbation labels (default: all)")
    _solver_args(p)
    p.add_argument("--space", type=Path, help="search space YAML (default: the solver's, shipped in tune/spaces/)")
    p.add_argument("--samples", type=int, default=16, help="trials (default 16)")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha",
                   help="asha (default: stops poor trials at its rungs) | fifo (every trial runs to the end)")
    p.add_argument("--search", choices=("random", "optuna"), default="random",
                   help="random (default) | optuna (TPE; needs pip install 'perturbot[tune]')")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster holds, 1 CPU each)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPU share per trial (default 0: CPU)")
    p.add_argument("--out", type=Path, help="search directory (default runs/tune-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search in --out (nothing else given)")
    p.add_argument("--top", type=int, default=10, help="trials shown in the leaderboard (default 10)")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("predict", help="predict perturbed cells from control cells with a trained run")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--data", required=True, help=".h5ad of control cells (same features as training)")
    p.add_argument("--perturbations", help="comma-separated map names (default: all)")
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
    p = sub.add_parser("metrics", help="metrics of a run: per map, model vs identity, observed, mean_shift, gaussian; "
                                       "of a search: its leaderboard")
    p.add_argument("--run", required=True, help="run directory, or a search's run id with --store")
    p.add_argument("--store")
    p.add_argument("--metric", help="only this metric")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--raw", action="store_true", help="every row (training logs, validation), not the summary")
    p.set_defaults(func=cmd_metrics)
    p = sub.add_parser("bench", add_help=False,
                       help="benchmarks (JSON out): stacked vs one-at-a-time (`bench --help`), 1 vs 2 Ray workers "
                            "(`bench workers`), data preparation (`bench data_prep`), W2 solvers against known maps "
                            "(`bench ground_truth`), per-iteration speed of the solvers (`bench solvers`), per-trial "
                            "overhead of a search (`bench tune_overhead`)")
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
