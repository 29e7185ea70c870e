"""A training run on a fake multi-node Ray cluster (ray.cluster_utils.Cluster) with one fault
injected mid-run. tests/test_faults.py runs it in a subprocess (it needs a Ray of its own):

    python tests/fault_cluster.py FAULT OUT_DIR

FAULT: worker (a Ray Train worker process is killed), node (the node of a training worker is
removed), shards (the shard stores are killed, then a worker, so the restarted workers read
from the restarted stores), driver (the driver process is killed; then `perturbot train --resume`).
Before the fault (after it, for driver) the placement of the cells is recorded: each shard store's
node, the node it is named for, the tables it holds, and the nodes of the training workers.
The cluster: a head with no CPUs (driver, controller, actors) and three 1-CPU nodes for the two
training workers, so a lost node leaves room for the restarted one. The data has 6 maps, one of
which (g1/pert2) overflows float32 and must fail on its own while the others finish. The run is
in OUT_DIR/run; the last stdout line is a JSON object saying what was injected.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_V2_ENABLED="1")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from engine.api import resume_run, run  # noqa: E402
from engine.config import RunConfig  # noqa: E402
from engine.data import make_synthetic  # noqa: E402
from engine.rundir import RunDir  # noqa: E402

STEPS = 150
BAD_MAP = "g1/pert2"  # its perturbed cells overflow float32 when squared: a map that fails for its own reason


def write_data(path: Path) -> None:
    adata = make_synthetic(n_perturbations=3, n_groups=2, dim=5, n_cells=150, seed=4)
    bad = ((adata.obs["condition"] == "pert2") & (adata.obs["group"] == "g1")).to_numpy()
    adata.X[bad] *= 1e19
    adata.write_h5ad(path)


def config(dataset: Path, address: str) -> RunConfig:
    return RunConfig.resolve(dataset=str(dataset), condition_key="condition", control="control", split_by="group",
                             steps=STEPS, workers=2, address=address,
                             train_params={"stack_size": 1, "checkpoint_every": 20, "eval_every": 50})


def raylet_pids(cluster: Cluster) -> dict[int, object]:
    return {p.process.pid: node for node in cluster.worker_nodes for p in node.all_processes.get("raylet", [])}


def worker_node_pids(cluster: Cluster, actor: bytes = b"RayTrainWorker") -> list[int]:
    """Processes of `actor` (default: Ray Train workers) in THIS cluster's worker nodes (children of
    its raylets; other Rays on the machine are left alone), from Linux /proc."""
    raylets = raylet_pids(cluster)
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if (entry.name.isdigit() and actor in (entry / "cmdline").read_bytes()
                    and parent_pid(int(entry.name)) in raylets):
                pids.append(int(entry.name))
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return pids


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def checkpoints(run_dir: Path) -> int:
    """Stacks with a training checkpoint that have not finished (no maps file yet)."""
    return sum(1 for p in (run_dir / "checkpoints").glob("*.train.pt")
               if not p.with_name(p.name.replace(".train.pt", ".maps.pt")).exists())


def node_of(cluster: Cluster, pid: int) -> object:
    """The fake node whose raylet started process `pid` (workers are the raylet's children)."""
    return raylet_pids(cluster)[parent_pid(pid)]


def placement(cluster: Cluster, run_id: str) -> dict | None:
    """Where the cells are once every training worker has fetched them: per shard store its node, the
    node in its name and its tables, and the training workers' nodes; None before that."""
    prefix = f"perturbot-shards-{run_id}-"
    stores = [name for name in ray.util.list_named_actors() if name.startswith(prefix)]
    workers = sorted({node_of(cluster, pid).node_id for pid in worker_node_pids(cluster)})
    held = {name: ray.get(ray.get_actor(name).held.remote()) for name in stores}
    if len(workers) < 2 or sum(1 for _, tables in held.values() if tables) < len(workers):
        return None
    return {"worker_nodes": workers,
            "stores": [{"named_for": name[len(prefix):], "node": node, "tables": len(tables)}
                       for name, (node, tables) in held.items()],
            # the metrics sink and Ray Train's controller belong on the driver's node (the head), not on a
            # training node that can be lost: their processes found on training nodes
            "driver_actors_on_worker_nodes": [actor.decode() for actor in (b"MetricsSink", b"TrainController")
                                              if worker_node_pids(cluster, actor)]}


def main(fault: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    dataset, run_dir = out / "cells.h5ad", out / "run"
    write_data(dataset)
    port = free_port()
    # Ray's helpers started in this cluster look for "the latest" Ray on the machine unless told
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "gcs_server_port": port})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    report: dict = {"fault": fault}
    if fault == "driver":  # a driver of its own, killed once its workers have checkpointed
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        driver = subprocess.Popen([sys.executable, "-m", "engine.cli", "train", "--data", str(dataset),
                                   "--condition-key", "condition", "--control", "control", "--split-by", "group",
                                   "--steps", str(STEPS), "--workers", "2", "--address", cluster.address,
                                   "--set", "train.stack_size=1", "--set", "train.checkpoint_every=20",
                                   "--set", "train.eval_every=50", "--out", str(run_dir)],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while checkpoints(run_dir) < 1 and driver.poll() is None:
            time.sleep(0.5)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        report["injected"] = f"driver killed with {checkpoints(run_dir)} stack checkpoints"
        ray.init(address=cluster.address)
        run_id = RunDir(run_dir).read_info()["run_id"]

        def observe(_progress: object) -> None:
            report["placement"] = report.get("placement") or placement(cluster, run_id)

        resume_run(run_dir, on_progress=observe)
    else:
        ray.init(address=cluster.address)
        done = False

        def inject(_progress: object) -> None:
            nonlocal done
            if done or not RunDir(run_dir).exists():
                return
            run_id = RunDir(run_dir).read_info()["run_id"]
            report["placement"] = report.get("placement") or placement(cluster, run_id)
            if checkpoints(run_dir) < 2 or not report["placement"]:  # both workers mid-stack, past a checkpoint:
                return  # whichever dies, its stack must resume from that checkpoint, not start again
            done = True
            victim = worker_node_pids(cluster)[0]
            if fault == "worker":
                os.kill(victim, signal.SIGKILL)
                report["injected"] = f"killed train worker {victim}"
            elif fault == "node":
                node = node_of(cluster, victim)
                cluster.remove_node(node, allow_graceful=False)
                report["injected"] = f"removed node {node.unique_id} (ran train worker {victim})"
            elif fault == "shards":
                stores = [n for n in ray.util.list_named_actors() if n.startswith(f"perturbot-shards-{run_id}-")]
                for name in stores:
                    ray.kill(ray.get_actor(name), no_restart=False)
                time.sleep(2.0)
                os.kill(victim, signal.SIGKILL)
                report["injected"] = f"killed the {len(stores)} shard stores of {run_id}, then train worker {victim}"

        run(config(dataset, cluster.address), run_dir, on_progress=inject)
    ray.shutdown()
    cluster.shutdown()
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]))))
