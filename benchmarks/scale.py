"""Scale: a synthetic job of many maps (default 1,000; d = 20) on the local 2-CPU Ray, at two step
budgets side by side, to measure what a map costs besides its training steps.

    python benchmarks/scale.py [--maps 1000] [--dim 20] [--steps 1 200] [--workers 2] [--out FILE.json]

Per step budget, one `engine.fit` (CellOT, stacks of `--stack-size` maps, one TorchTrainer fit):
  - wall_s: the whole job (data preparation, Ray Train set-up, training, evaluation, store writes,
    predictions, checkpoint files);
  - train_s: the summed `train_seconds` of its stacks (the loop itself, validation included),
    divided by the workers (they train in parallel);
  - overhead_s_per_map: (wall_s - train_s) / maps, what each map costs besides training;
  - peak_rss_mb: the peak resident memory of the driver, and of the driver plus every process it
    started (Ray's, its workers'), sampled every 0.5 s from /proc (Linux); the driver's also split
    into preparing (reading the file, preparing and saving the cells: up to the first progress
    report) and after (training, evaluation, predictions.h5ad), where it should hold no cells;
and every map's final status, so a job that lost maps shows it. The smallest budget stands for
"0 steps" (a run needs at least one). Numbers are from one run per budget (a 1,000-map job takes long
on 2 cores); compare budgets measured in the same invocation.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import emit  # noqa: E402
from engine.api import fit  # noqa: E402
from engine.cluster.runtime import connect  # noqa: E402
from engine.data import make_synthetic  # noqa: E402
from engine.progress import ProgressBar, RunProgress  # noqa: E402


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


class PeakMemory:
    """Peak RSS of this process (before and after `mark()`) and of its whole process tree, sampled in a thread."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s, self.tree_kb = every_s, 0
        self.driver_kb = {"preparing": 0, "after": 0}
        self._phase = "preparing"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def mark(self) -> None:
        self._phase = "after"

    def _sample(self) -> None:
        while not self._stop.is_set():
            pids = _descendants(os.getpid())
            self.driver_kb[self._phase] = max(self.driver_kb[self._phase], _rss_kb(os.getpid()))
            self.tree_kb = max(self.tree_kb, sum(_rss_kb(p) for p in pids))
            self._stop.wait(self.every_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(path: Path, steps: int, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    bar = ProgressBar(f"{steps} steps")
    with PeakMemory() as memory:

        def on_progress(progress: RunProgress) -> None:
            memory.mark()  # training has started: the data is prepared and saved
            bar(progress)

        started = time.perf_counter()
        result = fit(path, condition_key="condition", control="control", split_by="group", steps=steps,
                     train={"stack_size": args.stack_size, "eval_every": max(steps, 1)}, workers=args.workers,
                     out=root / f"steps{steps}", on_progress=on_progress)
        wall = time.perf_counter() - started
        bar.close()
    maps = result.maps()
    seconds = result.metrics(split="train", metric="train_seconds").merge(maps[["perturbation", "checkpoint"]])
    train = float(seconds.groupby("checkpoint")["value"].first().sum()) / args.workers  # one time per stack
    return {"steps": steps, "maps": len(maps), "statuses": maps["status"].value_counts().to_dict(),
            "wall_s": wall, "train_s": train, "overhead_s_per_map": (wall - train) / len(maps),
            "peak_rss_mb_driver": max(memory.driver_kb.values()) / 1024,
            "peak_rss_mb_driver_preparing": memory.driver_kb["preparing"] / 1024,
            "peak_rss_mb_driver_after": memory.driver_kb["after"] / 1024,
            "cells_mb": args.groups * (args.maps // args.groups + 1) * args.cells * args.dim * 4 / 2**20,
            "peak_rss_mb_all": memory.tree_kb / 1024}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--maps", type=int, default=1000)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--dim", type=int, default=20)
    p.add_argument("--cells", type=int, default=300, help="cells per (group, condition)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 200])
    p.add_argument("--stack-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    adata = make_synthetic(n_perturbations=args.maps // args.groups, n_groups=args.groups, dim=args.dim,
                           n_cells=args.cells, seed=0)
    connect("local", num_cpus=args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.h5ad"
        adata.write_h5ad(path)
        del adata  # the driver's memory is the job's own
        runs = [measure(path, steps, args, Path(tmp)) for steps in args.steps]
    report = {
        "benchmark": "scale",
        "config": {"maps": args.maps, "groups": args.groups, "dim": args.dim, "cells": args.cells,
                   "stack_size": args.stack_size, "workers": args.workers, "solver": "cellot",
                   "cpu_count": os.cpu_count(), "load_average": os.getloadavg()},
        "runs": runs,
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
