"""The long-lived actors of a training job.

ShardStore: one per node that trains, created by the driver when a worker of that node first asks
(the sink passes the request on) and placed on that node. It reads the cell tables (Arrow, features
as one fixed_size_list<float32> column) that its node's workers ask for from the run's storage, and
puts each in the node's object store once; the workers read them zero-copy by reference. Cells
never travel between nodes, and a node holds only the groups of the maps it trains. Restarted by
Ray, it starts empty and reads again on demand.
MetricsSink is the store's single writer, pinned to the driver's node (where the store is): workers
send metric and map rows (idempotent upserts, so a retried worker never duplicates a row) and
progress (steps per stack, map statuses), which the driver polls.
"""
from __future__ import annotations

import ray

from engine.data.prepared import TableKey, read_tables
from engine.storage import StoragePath
from engine.store import Store


def shard_store_name(run_id: str, node: str) -> str:
    return f"perturbot-shards-{run_id}-{node}"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)
class ShardStore:
    def __init__(self, data_dir: StoragePath) -> None:
        self._data_dir = data_dir
        self._refs: dict[TableKey, ray.ObjectRef] = {}

    def tables(self, keys: list[TableKey]) -> dict[TableKey, ray.ObjectRef]:
        """References to these tables, read from storage and put in the object store on first ask."""
        missing = [key for key in keys if key not in self._refs]
        self._refs.update((key, ray.put(table)) for key, table in read_tables(self._data_dir, missing).items())
        return {key: self._refs[key] for key in keys}

    def held(self) -> tuple[str, list[TableKey]]:
        """(this actor's node, the tables it holds)."""
        return ray.get_runtime_context().get_node_id(), sorted(self._refs)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)
class MetricsSink:
    def __init__(self, store_url: str) -> None:
        self._store = Store(store_url)
        self._steps: dict[str, int] = {}
        self._statuses: dict[str, str] = {}
        self._stopping = False
        self._shard_nodes: set[str] = set()

    def metrics(self, rows: list[dict]) -> None:
        self._store.upsert_metrics(rows)

    def maps(self, rows: list[dict]) -> None:
        self._store.upsert_maps(rows)
        self._statuses.update({row["perturbation"]: row["status"] for row in rows if "status" in row})

    def progress(self, stack: str, done: int) -> bool:
        """Record a stack's steps; True once the driver stops the run."""
        self._steps[stack] = done
        return self._stopping

    def want_shards(self, node: str) -> None:
        """A worker of `node` needs that node's shard store (the driver creates it)."""
        self._shard_nodes.add(node)

    def shard_nodes(self) -> set[str]:
        return set(self._shard_nodes)

    def stop(self) -> None:
        self._stopping = True

    def snapshot(self) -> tuple[dict[str, int], dict[str, str]]:
        """Steps done per stack and the latest status of each map, since this sink started."""
        return dict(self._steps), dict(self._statuses)


class SinkReporter:
    """engine.train.worker.Reporter over a MetricsSink handle (every call waits for the sink)."""

    def __init__(self, sink: ray.actor.ActorHandle) -> None:
        self._sink = sink

    def metrics(self, rows: list[dict]) -> None:
        ray.get(self._sink.metrics.remote(rows))

    def maps(self, rows: list[dict]) -> None:
        ray.get(self._sink.maps.remote(rows))

    def progress(self, stack: str, done: int) -> bool:
        return ray.get(self._sink.progress.remote(stack, done))
