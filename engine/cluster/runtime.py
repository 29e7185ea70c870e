"""Starting or joining Ray, and placing a run's workers on CPUs or GPUs (`train.device`)."""
from __future__ import annotations

import dataclasses
import os

import ray

from engine.config import ClusterConfig, RunConfig
from engine.options import DataError
from engine.train.device import parse_device, resolve_device


def connect(address: str = "local", num_cpus: int | None = None) -> None:
    """`local`: start a new Ray in this process (no dashboard, no auth token), even when a cluster
    started by `ray start` runs on this machine (Ray would join that one); otherwise join `address`."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if address == "local":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
        # worker logs stay in the Ray session dir; failures reach the user through the store (maps.error)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    else:
        ray.init(address=address)


def _pin_local_gpu(spec: str, index: int) -> None:
    """cuda:N on a local Ray: check that torch sees GPU N here, then let Ray see it alone."""
    if ray.is_initialized():
        raise DataError(f"device {spec} must be chosen before Ray starts in this process; use --device cuda "
                        "(Ray then places the workers)")
    resolve_device(spec)
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)


def connect_for(config: RunConfig, n_maps: int) -> ClusterConfig:
    """Join Ray for `config` and place its workers: the cluster settings the trainer runs with.

    cpu: CPU workers. cuda: gpus_per_worker (1 unless set) per worker. cuda:N (local Ray only): GPU
    N of this machine alone. auto: when the cluster has GPUs, a GPU per worker or an equal share of
them (DESIGN: fractional GPUs for small stacks), else CPU. A GPU
    request the cluster cannot meet (workers x gpus_per_worker) is a DataError (exit code 2) before
    any work starts. The run's config.yaml keeps what the user asked for. Every worker takes one CPU:
    more workers than the CPUs of a local Ray (fixed: the ones of this machine, or `num_cpus`) is
    also a DataError; a joined cluster may be autoscaling, so there the run waits for them (the
    progress line says what it waits for).
    """
    cluster = config.cluster
    kind, index = parse_device(config.train.device)
    if index is not None:
        if cluster.address != "local":
            raise DataError(f"device {config.train.device} pins a GPU of this machine; on a cluster use "
                            "--device cuda (Ray places the workers)")
        _pin_local_gpu(config.train.device, index)
    connect(cluster.address)
    resources = ray.cluster_resources()
    available = resources.get("GPU", 0.0)
    workers = cluster.workers if config.solver_cls.shared else max(1, min(cluster.workers, n_maps))
    if workers > config.train.batch_size:  # data parallel: each worker draws at least one cell per minibatch
        raise DataError(f"{workers} data-parallel workers need train.batch_size >= {workers}, got {config.train.batch_size}")
    cpus = resources.get("CPU", 0.0)
    if cluster.address == "local" and workers > cpus:
        raise DataError(f"{workers} workers need {workers} CPUs, but this local Ray has {cpus:g} CPU(s) and cannot "
                        f"grow; use --workers {max(1, int(cpus))} or join a larger cluster with --address")
    gpus = cluster.gpus_per_worker
    if kind == "cuda" and gpus == 0:
        gpus = 1.0
    if kind == "auto" and gpus == 0 and available > 0:
        gpus = min(1.0, available / workers)
    if gpus * workers > available:
        raise DataError(f"device {config.train.device} needs {workers} worker(s) x {gpus:g} GPU(s), "
                        f"but the Ray cluster has {available:g} GPU(s)")
    return dataclasses.replace(cluster, workers=workers, gpus_per_worker=gpus)
