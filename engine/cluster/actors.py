"""The two long-lived actors of a training job.

ShardStore owns the prepared cell tables (Arrow, features as one fixed_size_list<float32> column)
and puts each one in the object store once; workers read them zero-copy by reference. It reloads
from the run's data directory when Ray restarts it.
MetricsSink is the store's single writer: workers send metric and map rows (idempotent upserts,
so a retried worker never duplicates a row) and progress (steps per stack, map statuses), which
the driver polls.
"""
from __future__ import annotations

import dataclasses

import ray

from engine.data import PreparedData
from engine.storage import StoragePath
from engine.store import Store


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)
class ShardStore:
    def __init__(self, data_dir: StoragePath) -> None:
        self._prepared = PreparedData.load(data_dir)
        self._refs = {key: ray.put(table) for key, table in self._prepared.tables.items()}

    def layout(self) -> PreparedData:
        """Everything but the cells (spec, features, maps, embedding, markers)."""
        return dataclasses.replace(self._prepared, tables={})

    def tables(self, keys: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], ray.ObjectRef]:
        return {key: self._refs[key] for key in keys}


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)
class MetricsSink:
    def __init__(self, store_url: str) -> None:
        self._store = Store(store_url)
        self._steps: dict[str, int] = {}
        self._statuses: dict[str, str] = {}
        self._stopping = False

    def metrics(self, rows: list[dict]) -> None:
        self._store.upsert_metrics(rows)

    def maps(self, rows: list[dict]) -> None:
        self._store.upsert_maps(rows)
        self._statuses.update({row["perturbation"]: row["status"] for row in rows if "status" in row})

    def progress(self, stack: str, done: int) -> bool:
        """Record a stack's steps; True once the driver stops the run."""
        self._steps[stack] = done
        return self._stopping

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
