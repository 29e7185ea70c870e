"""One Ray Train fit per job: each worker owns whole maps, balanced by cell count, and trains
them as stacks with the device-level loop (engine.train). No gradients are exchanged between
workers: different maps share nothing. A shared solver (one model over all contexts, CondOT) is
trained data-parallel instead: every worker trains the one stack on its share of each minibatch,
and the gradients are averaged over the workers before every optimizer step by an explicit
all-reduce (engine.solvers.optim.worker_average over torch.distributed; DDP's hooks fire in
.backward() only, and the solvers take their gradients with torch.autograd.grad).
"""
from __future__ import annotations

import dataclasses
import socket
import threading
import time

import ray
import torch
import torch.distributed as dist
from ray.train import FailureConfig, ScalingConfig
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from engine.cluster.actors import MetricsSink, ShardStore, SinkReporter, shard_store_name
from engine.config import RunConfig
from engine.data import MapKey, PreparedData
from engine.progress import ProgressFn, RunProgress
from engine.rundir import RunDir
from engine.solvers.optim import worker_average
from engine.storage import StoragePath
from engine.train.stack import stack_id, stacks_of
from engine.train.stack_data import batch_share
from engine.train.loop import StopRequested
from engine.train.worker import FINAL_STATUSES, MapRun, train_maps


def balance(maps: list[MapKey], weights: list[int], workers: int) -> list[list[MapKey]]:
    """Greedy longest-first assignment of maps to workers by cell count (each list sorted by name)."""
    loads = [0] * workers
    owned: list[list[MapKey]] = [[] for _ in range(workers)]
    for weight, key in sorted(zip(weights, maps), key=lambda p: (-p[0], p[1].name)):
        w = loads.index(min(loads))
        owned[w].append(key)
        loads[w] += weight
    return [sorted(keys, key=lambda k: k.name) for keys in owned]


def train_worker(loop_config: dict) -> None:
    """Per-worker function: fetch this worker's cells zero-copy, train its maps stack by stack (a
    shared model: every worker the same stack, on its share of each minibatch)."""
    context = ray.train.get_context()
    rank = context.get_world_rank()
    keys = [MapKey(*k) for k in loop_config["assignments"][rank]]
    if not keys:
        return
    node = ray.get_runtime_context().get_node_id()
    print(f"worker {rank} on node {node} ({socket.gethostname()}) trains {len(keys)} maps: "
          + ", ".join(k.name for k in keys), flush=True)  # the worker log says who trains what
    config = RunConfig.from_dict(loop_config["config"])
    run_dir = RunDir(loop_config["run_dir"], storage=loop_config["storage"])  # a worker touches the storage only
    layout = PreparedData.load(run_dir.data, tables=())
    control = layout.spec.control
    wanted = sorted({
        (k.group or "", condition, split)
        for k in keys
        for condition in (control, k.perturbation)
        for split in layout.spec.splits
    })
    sink = ray.get_actor(loop_config["sink"])
    fetch_started = time.perf_counter()
    refs = ray.get(node_shard_store(sink, loop_config["run_id"], node).tables.remote(wanted))
    tables = dict(zip(refs, ray.get(list(refs.values()))))
    megabytes = sum(table.nbytes for table in tables.values()) / 2**20
    print(f"worker {rank} fetched {megabytes:.1f} MB of cells from the shard store of its node in "
          f"{time.perf_counter() - fetch_started:.2f} s", flush=True)  # read from storage by the first worker of a node
    prepared = dataclasses.replace(layout, tables=tables)
    if config.cluster.gpus_per_worker > 0:
        device = ray.train.torch.get_device()
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    reporter = SinkReporter(sink)
    workers = context.get_world_size()
    parallel = config.solver_cls.shared and workers > 1
    share = (rank, workers) if parallel else (0, 1)
    average = worker_average(batch_share(share, config.train.batch_size), dist.all_reduce) if parallel else None
    try:
        train_maps(MapRun(prepared, config, run_dir, reporter, device, loop_config["run_id"], share, average), keys)
    except StopRequested:  # the driver stops the run: the running stack has checkpointed
        return


SHARD_WAIT_S = 120.0  # how long a worker waits for the driver to start its node's shard store


def node_shard_store(sink: ray.actor.ActorHandle, run_id: str, node: str) -> ray.actor.ActorHandle:
    """The shard store of this worker's node: asked of the driver through the sink, then looked up."""
    ray.get(sink.want_shards.remote(node))
    waited = time.monotonic() + SHARD_WAIT_S
    while True:
        try:
            return ray.get_actor(shard_store_name(run_id, node))
        except ValueError:  # not created yet (the driver polls every half second)
            if time.monotonic() > waited:
                raise RuntimeError(f"no shard store for node {node} after {SHARD_WAIT_S:g} s: is the driver alive?")
            time.sleep(0.2)


def start_shard_stores(sink: ray.actor.ActorHandle, stores: dict[str, ray.actor.ActorHandle], run_id: str,
                       data_dir: StoragePath) -> None:
    """Create the shard store of every node whose workers asked for one and has none yet, pinned to that
    node (soft affinity placed 0-CPU actors anywhere in Ray 2.60: measured; a lost node's store goes
    with it, as do its workers). The driver owns them all."""
    for node in sorted(ray.get(sink.shard_nodes.remote()) - set(stores)):
        stores[node] = ShardStore.options(
            name=shard_store_name(run_id, node),
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(data_dir)


STOP_WAIT_S = 60.0  # how long a stopped run waits for its workers to checkpoint


def run_training(
    config: RunConfig,
    prepared: PreparedData,
    run_dir: RunDir,
    run_id: str,
    store_url: str,
    on_progress: ProgressFn | None = None,
) -> None:
    """Start the shard store and metrics sink, run ONE TorchTrainer fit, report progress while it runs.

    Stacks whose maps file exists are done (a resumed run skips them); the others resume from
    their checkpoints. On KeyboardInterrupt the workers checkpoint where they are and stop. on_progress(RunProgress) is called about twice a second. config.cluster is
    the placed one (engine.cluster.runtime.connect_for): a shared solver (one model over all
    contexts, CondOT) is one stack that every worker trains, data-parallel.
    """
    cls = config.solver_cls
    workers = config.cluster.workers  # placed: at most one per map (a shared solver: any number, data-parallel)
    if cls.shared:
        assignments = [list(prepared.maps)] * workers
    else:
        assignments = balance(prepared.maps, [prepared.n_cells(k) for k in prepared.maps], workers)
    stacks = {stack_id(chunk): chunk for keys in assignments for chunk in stacks_of(keys, config.train.stack_size, cls.shared)}
    finished = {stack for stack in stacks if run_dir.maps_file(stack).exists()}
    steps_per_stack = cls.plan(config.solver_config(), config.train.steps).total
    if len(finished) == len(stacks):  # a resumed run that had finished training
        return
    # the store's writer runs on the driver's node, where its store is (an SQLite file); unpinned, Ray
    # places a 0-CPU actor on any node, one that may be lost
    sink = MetricsSink.options(
        name=f"perturbot-sink-{run_id}",
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(store_url)
    stores: dict[str, ray.actor.ActorHandle] = {}
    use_gpu = config.cluster.gpus_per_worker > 0
    resources = {"CPU": 1, **({"GPU": config.cluster.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": config.to_dict(),
            "assignments": [[tuple(k) for k in keys] for keys in assignments],
            "sink": f"perturbot-sink-{run_id}",
            "run_dir": str(run_dir.root.resolve()),
            "storage": run_dir.storage,  # a StoragePath: pickled with its filesystem
            "run_id": run_id,
        },
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RayRunConfig(
            name=run_id,
            storage_path=run_dir.ray_storage.path,
            storage_filesystem=run_dir.ray_storage.fs,
            failure_config=FailureConfig(max_failures=2),
        ),
    )
    outcome: dict[str, object] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # re-raised on the driver thread below
            outcome["error"] = error

    def progress() -> RunProgress:
        steps, statuses = ray.get(sink.snapshot.remote())
        done_maps = {k.name for stack in finished for k in stacks[stack]}
        done_maps |= {name for name, status in statuses.items() if status in FINAL_STATUSES}
        return RunProgress(
            maps_done=len(done_maps),
            maps=len(prepared.maps),
            map_steps=sum(len(chunk) * (steps_per_stack if stack in finished else steps.get(stack, 0))
                          for stack, chunk in stacks.items()),
            map_steps_total=steps_per_stack * len(prepared.maps),
            waiting="" if steps else f"starting {workers} worker(s)",
        )

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
            start_shard_stores(sink, stores, run_id, run_dir.data)
            if on_progress is not None:
                on_progress(progress())
    except KeyboardInterrupt:  # workers checkpoint the step they reached and return (one more Ctrl-C: don't wait)
        sink.stop.remote()
        if ray.get(sink.snapshot.remote())[0]:  # workers are training (else there is nothing to wait for)
            thread.join(STOP_WAIT_S)
        raise
    finally:
        ray.get(sink.snapshot.remote())  # every queued row is written before the sink goes
        for actor in (*stores.values(), sink):
            ray.kill(actor)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
