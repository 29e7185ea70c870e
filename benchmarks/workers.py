"""Ray scaling: the same maps trained by 1 and by 2 Ray Train workers, side by side in one run.

    python benchmarks/workers.py [--maps 8] [--dim 24] [--steps 300] [--stack-size 4] [--out FILE.json]
    python benchmarks/workers.py --solver condot [--dim 24] [--steps 300] [--batch-size 1024]

Synthetic data (engine.data.make_synthetic), CellOT defaults, one TorchTrainer fit per measurement,
the same stack size for both (so each worker runs the same stacks; only the number of workers
changes). `--solver condot`: one CondOT model over the synthetic dose response (4 doses, log
embedding, CondOT defaults otherwise), trained data-parallel: each worker draws half of every
global minibatch of --batch-size and the gradients are all-reduced. Reported per worker count, medians over --repeats:
  - train_map_steps_per_s: maps * steps / training seconds, where training seconds is the busiest
    worker's summed stack time (the `train_seconds` rows each stack writes to the store);
  - wall_map_steps_per_s: maps * steps / the whole fit's wall time (includes ~10 s of Ray Train set-up);
and the ratios 2 workers / 1 worker. One CPU per worker, one torch thread each.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import emit  # noqa: E402
from engine.api import fit  # noqa: E402
from engine.cluster.runtime import connect  # noqa: E402
from engine.cluster.trainer import balance  # noqa: E402
from engine.data import PreparedData, make_dose_response, make_synthetic  # noqa: E402


def measure(path: Path, workers: int, args: argparse.Namespace, root: Path) -> dict[str, float]:
    started = time.perf_counter()
    train = {"stack_size": args.stack_size, "eval_every": args.steps, "batch_size": args.batch_size}
    if args.solver == "condot":
        result = fit(path, condition_key="dose", control="0", solver="condot", context_keys=["dose"],
                     embeddings=["dose=log"], steps=args.steps, train=train, workers=workers,
                     out=root / f"w{workers}-{time.time_ns()}")
    else:
        result = fit(path, condition_key="condition", control="control", split_by="group", steps=args.steps,
                     train=train, workers=workers, out=root / f"w{workers}-{time.time_ns()}")
    wall = time.perf_counter() - started
    seconds = result.metrics(split="train", metric="train_seconds").set_index("perturbation")["value"]
    prepared = PreparedData.load(result.dir.data)
    if args.solver == "condot":  # one stack, trained by every worker at once: its time is on each map
        busiest = float(seconds.max())
    else:
        owned = balance(prepared.maps, [prepared.n_cells(k) for k in prepared.maps], workers)  # as the trainer did
        # a stack writes its time on each of its maps: one map per stack, summed per worker
        busiest = max(sum(seconds[k.name] for k in keys[:: args.stack_size]) for keys in owned if keys)
    map_steps = len(prepared.maps) * args.steps
    return {"train_map_steps_per_s": map_steps / busiest, "wall_map_steps_per_s": map_steps / wall,
            "train_seconds": busiest, "wall_seconds": wall}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--maps", type=int, default=8)
    p.add_argument("--dim", type=int, default=24)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--stack-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--solver", choices=("cellot", "condot"), default="cellot")
    p.add_argument("--batch-size", type=int, default=256, help="train.batch_size (condot: the global batch)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    groups = 2
    if args.solver == "condot":  # one model over the 4 doses
        adata = make_dose_response(dim=args.dim, n_cells=1500, seed=0)
        maps = adata.obs["dose"].nunique() - 1
    else:
        adata = make_synthetic(n_perturbations=args.maps // groups, n_groups=groups, dim=args.dim, n_cells=1500, seed=0)
        maps = args.maps
    connect("local", num_cpus=2)
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.h5ad"
        adata.write_h5ad(path)
        for _ in range(args.repeats):
            for workers in (1, 2):  # alternate, so drift in machine load hits both alike
                runs[workers].append(measure(path, workers, args, Path(tmp)))
    summary = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for w, rs in runs.items()}
    report = {
        "benchmark": "ray_workers",
        "config": {"maps": maps, "dim": args.dim, "steps": args.steps, "stack_size": args.stack_size,
                   "repeats": args.repeats, "solver": args.solver, "batch_size": args.batch_size,
                   "cpus_per_worker": 1, "torch_threads": 1},
        "workers_1": summary[1],
        "workers_2": summary[2],
        "ratio_train_2_over_1": summary[2]["train_map_steps_per_s"] / summary[1]["train_map_steps_per_s"],
        "ratio_wall_2_over_1": summary[2]["wall_map_steps_per_s"] / summary[1]["wall_map_steps_per_s"],
        "runs": runs,
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
