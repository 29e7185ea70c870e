"""Starting or joining Ray, and placing a run's workers on CPUs or GPUs (`train.device`)."""
from __future__ import annotations

import os

import ray

from engine.config import RunConfig
from engine.options import DataError


def connect(address: str = "local", num_cpus: int | None = None, gpu: int | None = None) -> None:
    """`local`: start Ray in this process (no dashboard, no auth token), seeing only GPU `gpu` when
    given; otherwise join `address`."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if address == "local":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
        if gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        # worker logs stay in the Ray session dir; failures reach the user through the store (maps.error)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address)


def connect_for(config: RunConfig) -> None:
    """Join Ray for `config` and make its device real: `cuda:N` on a local Ray shows Ray GPU N
    alone; `auto` takes one GPU per worker when the cluster has GPUs; a GPU request the cluster
    cannot meet is a DataError (exit code 2) before any work starts."""
    device, cluster = config.train.device, config.cluster
    index = device.partition(":")[2]
    if index and cluster.address != "local":
        raise DataError(f"device {device} pins a GPU of this machine; on a cluster use --device cuda (Ray places workers)")
    connect(cluster.address, gpu=int(index) if index and not ray.is_initialized() else None)
    available = ray.cluster_resources().get("GPU", 0.0)
    if device == "auto" and cluster.gpus_per_worker == 0 and available >= 1:
        cluster.gpus_per_worker = 1.0
    if cluster.gpus_per_worker > available:
        raise DataError(f"device {device} needs {cluster.gpus_per_worker:g} GPU(s) per worker, "
                        f"but the Ray cluster has {available:g} GPU(s)")
