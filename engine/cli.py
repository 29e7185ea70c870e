"""`perturbot`: train, demo, tune, predict, evaluate, runs, metrics, report, submit, jobs, bench.

Errors are one line on stderr: exit code 2 for bad input (data, options), 1 for a failed run.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence


from engine.cluster.jobs import DEFAULT_ADDRESS
from engine.data import DataError
from engine.data.spec import PREPROCESSING, SELECT_ON
from engine.rundir import RunDir, default_run_dir
from engine.solvers import SOLVERS

DEMO_STEPS = 1000  # the demo's default budget (a few minutes on a laptop CPU); --steps overrides


def _data_args(p: argparse.ArgumentParser, perturbations_help: str, groups_help: str, with_data: bool = True) -> None:
    if with_data:
        p.add_argument("--data", help="input .h5ad (dense or sparse X, or --obsm-key); or `dataset` in --config")
        p.add_argument("--condition-key", help="obs column holding the condition labels (or data.condition_key)")
        p.add_argument("--control", help="control label in that column (or data.control)")
        p.add_argument("--perturbations", help=perturbations_help)
    p.add_argument("--split-by", help="obs key: one map per (group, perturbation), controls from the same group")
    p.add_argument("--only-groups", metavar="G[,G]", help=groups_help)
    p.add_argument("--holdout", metavar="KEY=VALUE[,VALUE]", help="cells with obs[KEY] equal to one of the values form "
                   "the test split (o.o.s.); with --context-keys a context whose cells are all held out is not trained "
                   "on, only evaluated")
    p.add_argument("--context-keys", metavar="KEY[,KEY]",
                   help="condot: what the map is conditioned on, the condition key and/or the split-by key")
    p.add_argument("--embedding", action="append", default=[], metavar="KEY=onehot|value|log|moa",
                   help="embedding of a context key (default onehot; 'A+B' labels are multi-hot); value: the "
                        "label as a number, scaled; log: log10 of it, scaled; moa (condition key): mode of "
                        "action, an MDS of W2 distances between perturbed populations")
    p.add_argument("--growth", type=Path, metavar="CSV",
                   help="observed cell-count ratios (treated / control) per perturbation: columns perturbation, "
                        "growth [, group]; they multiply the predicted weights (nubot's obs['weight'])")
    p.add_argument("--preprocess", choices=PREPROCESSING, help="default none")
    p.add_argument("--hvg", type=int, metavar="N",
                   help="keep the N most highly variable features (Seurat dispersion on log1p expression, "
                        "ranked on train cells after --preprocess), e.g. 1000 genes")
    p.add_argument("--embed", help="train in a latent space: pca:K or ae:K (an autoencoder; metrics decoded to genes)")
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
    _data_args(p, "'all' (default) or a comma-separated list of labels",
               "with --split-by: train only these groups' maps (comma-separated labels of that key; default all, "
               "or data.groups)", with_data)
    if with_data:
        p.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR",
                       help="finish a stopped run: its unfinished maps from their last checkpoints (`--resume "
                            "RUN_DIR` alone, or the run's own train command with --resume)")
    _solver_args(p)
    p.add_argument("--out", type=Path, help="run directory (default runs/<time>)")
    p.add_argument("--storage", help="where workers write cells, checkpoints, maps, predictions: a path every node "
                                      "mounts, or s3://BUCKET/PREFIX, gs://BUCKET/PREFIX (pyarrow filesystems; "
                                      "default: the run directory)")
    p.add_argument("--device", help="auto (default: a GPU per worker when Ray has GPUs) | cpu | cuda | cuda:N")
    p.add_argument("--workers", type=int, help="Ray Train workers (each owns whole maps; condot: data-parallel, "
                   "each draws a share of every minibatch)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (fractions allowed; 0 = CPU)")


def _key_value(item: str, option: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise DataError(f"{option} expects KEY=VALUE, got {item!r}")
    return key, value


def _holdout(item: str) -> list[str | list[str]]:
    """[KEY, [VALUE, ...]] of `--holdout KEY=V1,V2,...`."""
    key, values = _key_value(item, "--holdout")
    parts = [v.strip() for v in values.split(",")]
    if not all(parts):
        raise DataError(f"--holdout expects KEY=VALUE[,VALUE...] with no empty value, got {item!r}")
    return [key, parts]


def _read_growth(path: Path) -> dict[str, float]:
    """{perturbation or "GROUP/PERTURBATION": factor} from a CSV with columns perturbation, growth [, group]."""
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype={"perturbation": str, "group": str})
    except (OSError, ValueError) as err:
        raise DataError(f"--growth {path}: {err}") from None
    missing = {"perturbation", "growth"} - set(table.columns)
    if missing:
        raise DataError(f"--growth {path}: missing column(s) {', '.join(sorted(missing))}; columns: {', '.join(table.columns)}")
    factors = pd.to_numeric(table["growth"], errors="coerce")
    if factors.isna().any() or (factors <= 0).any():
        raise DataError(f"--growth {path}: every growth must be a number > 0 (row {int((factors.isna() | (factors <= 0)).idxmax()) + 2})")
    groups = table["group"].fillna("") if "group" in table else [""] * len(table)
    names = [f"{g}/{p}" if g else str(p) for g, p in zip(groups, table["perturbation"])]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"--growth {path}: {repeated[0]!r} is listed twice")
    return dict(zip(names, factors.astype(float)))


def _resolve_config(args: argparse.Namespace, dataset: str | None, condition_key: str | None, control: str | None,
                    perturbations: str | None, split_by: str | None) -> Any:
    from engine.config import RunConfig

    holdout = _holdout(args.holdout) if args.holdout else None
    wanted = None if perturbations in (None, "all") else [p.strip() for p in perturbations.split(",") if p.strip()]
    groups = [g.strip() for g in args.only_groups.split(",") if g.strip()] if args.only_groups else None
    return RunConfig.resolve(
        args.config, args.set, dataset=dataset, condition_key=condition_key, control=control,
        perturbations=wanted, split_by=split_by, groups=groups, holdout=holdout, preprocess=args.preprocess, hvg=args.hvg,
        embed=args.embed,
        obsm_key=args.obsm_key, select_on=args.select_on, seed=args.seed, solver=args.solver,
        context_keys=[k.strip() for k in args.context_keys.split(",") if k.strip()] if args.context_keys else None,
        embeddings=args.embedding or None, growth=_read_growth(args.growth) if getattr(args, "growth", None) else None,
        published=args.published or None, steps=args.steps, device=getattr(args, "device", None),
        address=args.address, workers=getattr(args, "workers", None),
        gpus_per_worker=getattr(args, "gpus_per_worker", None),
    )


def _run(config: Any, out: Path | None, store: str | None, resume: bool = False, storage: str | None = None) -> int:
    from engine.api import resume_run, run
    from engine.progress import ProgressBar

    run_dir = out or default_run_dir()
    bar = ProgressBar(f"training {config.solver if config else 'resumed run'}")
    try:
        result = (run(config, run_dir, store, on_progress=bar, resume=resume, storage=storage) if config
                  else resume_run(run_dir, None, store, bar))
    except KeyboardInterrupt:
        done = f"{bar.last.maps_done}/{bar.last.maps} maps done; " if bar.last else ""
        bar.close(f"perturbot: interrupted ({done}finish with `perturbot train --resume {run_dir}`)")
        return 130
    finally:
        bar.close()
    maps = result.maps()
    print(f"run {result.run_id}: {len(maps)} maps, "
          + ", ".join(f"{n} {s}" for s, n in maps["status"].value_counts().items()) + f" -> {run_dir}")
    for row in maps[maps["error"].notna()].itertuples():
        print(f"  {row.perturbation}: {row.status}: {row.error}", file=sys.stderr)
    _print_frame(result.summary(), "table")
    return 0 if result.succeeded() else 1


def cmd_train(args: argparse.Namespace) -> int:
    resume_dir = Path(args.resume) if isinstance(args.resume, str) else None
    if resume_dir is not None and args.out is not None and resume_dir.resolve() != args.out.resolve():
        raise DataError(f"--resume {resume_dir} and --out {args.out} name different run directories")
    missing = [flag for flag, value in (("--data", args.data), ("--condition-key", args.condition_key),
                                        ("--control", args.control)) if value is None]
    if resume_dir is not None and len(missing) == 3:  # `train --resume RUN_DIR`: the run's own settings
        if args.set or args.config or args.steps is not None:
            raise DataError("--resume RUN_DIR alone finishes the run with its own settings; drop --set/--config/--steps")
        return _run(None, resume_dir, args.store, resume=True)
    if missing and args.config is None:
        raise DataError(f"train needs {', '.join(missing)} (or --config FILE, or --resume RUN_DIR to finish a stopped run)")
    if args.resume is True and args.out is None:
        raise DataError("--resume without a run directory needs --out RUN_DIR (the run to finish)")
    dataset = str(args.data) if args.data is not None else None
    config = _resolve_config(args, dataset, args.condition_key, args.control, args.perturbations, args.split_by)
    return _run(config, resume_dir or args.out, args.store, resume=args.resume is not None, storage=args.storage)


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
    return _run(config, out, args.store, storage=args.storage)


def cmd_tune(args: argparse.Namespace) -> int:
    from tune.search import SearchSettings, load_space, resume, start

    with contextlib.redirect_stdout(sys.stderr):  # Tune's own messages; stdout keeps the leaderboard
        if args.resume:
            if args.out is None or args.data is not None or args.config is not None:
                raise DataError("--resume continues the search in --out DIR with its own settings; give only --out")
            result = resume(args.out)
        else:
            dataset = None if args.data is None else str(args.data)
            config = _resolve_config(args, dataset, args.condition_key, args.control, args.perturbations,
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
    groups = [g.strip() for g in args.groups.split(",")] if args.groups else None
    context = dict(_key_value(item, "--context") for item in args.context) if args.context else None
    adata = read_h5ad(args.data)
    predicted = result.predict(adata, wanted, groups, context=context,
                               on_note=lambda m: print(f"perturbot: note: {m}", file=sys.stderr))
    predicted.write_h5ad(args.out)
    obs = predicted.obs
    n_maps = len(obs.groupby(["group", "perturbation"] if "group" in obs else ["perturbation"], observed=True))
    in_groups = f" in {obs['group'].nunique()} groups" if "group" in obs else ""
    print(f"{predicted.n_obs} predicted cells: {obs['source_cell'].nunique()} of {adata.n_obs} input cells through "
          f"{n_maps} maps ({obs['perturbation'].nunique()} perturbations{in_groups}) -> {args.out}")
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
        with Store(url) as store:
            runs, statuses = store.runs(), store.map_statuses()
        runs["maps"] = [_map_progress(statuses[statuses["run_id"] == run_id]) for run_id in runs["run_id"]]
        frames.append(runs)
    if not frames or all(f.empty for f in frames):
        print("no runs found" + ("" if args.store else f" under {args.root}/ (use --store URL)"))
        return 0
    runs = pd.concat(frames)[["run_id", "kind", "solver", "dataset", "status", "maps", "created_at", "finished_at"]]
    print(runs.to_string(index=False))
    return 0


def _map_progress(statuses: Any) -> str:
    """`5/8 done (3 trained, 1 diverged, 1 failed, 2 running, 1 pending)` from one run's status counts."""
    from engine.train.worker import FINAL_STATUSES

    counts = dict(zip(statuses["status"], statuses["maps"]))
    done = sum(n for status, n in counts.items() if status in FINAL_STATUSES)
    return f"{done}/{sum(counts.values())} done (" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")"


def _print_frame(frame: Any, fmt: str, empty: str = "no metrics yet") -> None:
    if frame.empty:
        print(empty)
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


def cmd_report(args: argparse.Namespace) -> int:
    from engine.report import render_report

    features = int(args.features) if args.features.isdigit() else [f.strip() for f in args.features.split(",") if f.strip()]
    path = render_report(args.run, args.out, store=args.store, detail=args.detail, features=features,
                         n_clusters=args.clusters, cluster_key=args.cluster_key)
    print(f"report -> {path} (plots in {Path(args.run) / 'plots'})")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from engine.cluster import jobs

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    client = jobs.connect(args.address)
    job = jobs.submit(client, command, install=args.install)
    print(f"job {job}", flush=True)
    if args.no_wait:
        print(f"follow it with `perturbot jobs logs {job} --follow`", file=sys.stderr)
        return 0
    status = jobs.follow(client, job)
    print(f"job {job}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    import pandas as pd

    from engine.cluster import jobs

    client = jobs.connect(args.address)
    if args.action == "list":
        rows = [{"job": j.submission_id, "status": str(j.status.value), "entrypoint": j.entrypoint[:80],
                 "started": pd.to_datetime(j.start_time, unit="ms") if j.start_time else None}
                for j in client.list_jobs()]
        _print_frame(pd.DataFrame(rows), "table", empty="no jobs")
        return 0
    if args.job is None:
        raise DataError(f"jobs {args.action} needs a job id (see `perturbot jobs list`)")
    if args.action == "status":
        info = client.get_job_info(args.job)
        print(f"{args.job}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    elif args.action == "logs":
        if args.follow:
            return 0 if jobs.follow(client, args.job) == "SUCCEEDED" else 1
        print(client.get_job_logs(args.job), end="")
    else:
        print(f"{args.job}: " + ("stopping" if client.stop_job(args.job) else "already finished"))
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
    _data_args(p, "the tuning subset: comma-separated perturbation labels (default: all)",
               "with --split-by: the tuning subset's groups, e.g. three donors (comma-separated labels of that "
               "key; default all); best.yaml keeps every group")
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
    p.add_argument("--groups", help="send every cell through these groups' maps (default: each cell through its own "
                                    "group's maps when obs has the run's --split-by key, else through all)")
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
    p = sub.add_parser("metrics", help="metrics of a run: per map, model vs identity, observed, mean_shift, gaussian; "
                                       "of a search: its leaderboard")
    p.add_argument("--run", required=True, help="run directory, or a search's run id with --store")
    p.add_argument("--store")
    p.add_argument("--metric", help="only this metric")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--raw", action="store_true", help="every row (training logs, validation), not the summary")
    p.set_defaults(func=cmd_metrics)
    p = sub.add_parser("report", help="one self-contained HTML report of a run (metrics, marginals, embeddings, "
                                      "transport costs, training curves); PNGs in RUN_DIR/plots/")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--out", type=Path, help="HTML file (default RUN_DIR/report.html)")
    p.add_argument("--store")
    p.add_argument("--detail", type=int, default=3, help="maps of largest and of smallest effect shown in detail")
    p.add_argument("--features", default="4", help="marginals of the N most changed features of each map (default 4), "
                                                   "or of the features named, e.g. pS6,pPlcg2,pErk (prefixes allowed)")
    p.add_argument("--clusters", type=int, default=6, help="k-means clusters of control cells for the cost map")
    p.add_argument("--cluster-key", help="obs key of the run's dataset to use as clusters instead of k-means")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("submit", help="run train/demo/evaluate as a job on a Ray cluster (Jobs API), follow its logs")
    p.add_argument("--address", help=f"the cluster's dashboard URL (default: RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--install", action="store_true",
                   help="pip-install perturbot's dependencies into the job's runtime env (clusters without them)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- train|demo|evaluate ARGS (give --out on shared storage)")
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("jobs", help="jobs on a Ray cluster: list, status JOB, logs JOB [--follow], stop JOB")
    p.add_argument("action", choices=("list", "status", "logs", "stop"))
    p.add_argument("job", nargs="?", help="job (submission) id")
    p.add_argument("--address", help=f"the cluster's dashboard URL (default: RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    p.add_argument("--follow", action="store_true", help="logs: stream them until the job ends")
    p.set_defaults(func=cmd_jobs)
    p = sub.add_parser("bench", add_help=False,
                       help="benchmarks (JSON out): stacked vs one-at-a-time (`bench --help`), 1 vs 2 Ray workers "
                            "(`bench workers`), data preparation (`bench data_prep`), W2 solvers against known maps "
                            "(`bench ground_truth`), per-iteration speed of the solvers (`bench solvers`), "
                            "Sinkhorn against POT (`bench sinkhorn`), per-trial overhead of a search (`bench tune_overhead`), "
                            "CondOT's contexts per step (`bench condot`)")
    p.set_defaults(func=cmd_bench)
    return parser


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:
        return cmd_bench(argparse.Namespace(), [a for a in argv[1:] if a != "--"])
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops a run as Ctrl-C does (its maps: interrupted)
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe is reported here, not at exit
        return code
    except DataError as error:
        print(f"perturbot: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("perturbot: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `perturbot metrics | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as error:  # a failed run: one line, the details are in the run directory / logs
        print(f"perturbot: run failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
