"""The metrics store: SQLite by default, any SQLAlchemy URL (e.g. PostgreSQL).

Tables (DESIGN.md): runs, maps, metrics, trials. Every write is an idempotent upsert keyed by the
table's primary key, so a retried worker never duplicates or loses a row. A row may carry only some
columns (e.g. a status update); the others keep their stored values.
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

METADATA = sa.MetaData()
RUNS = sa.Table(
    "runs", METADATA,
    sa.Column("run_id", sa.String, primary_key=True),
    sa.Column("kind", sa.String), sa.Column("solver", sa.String), sa.Column("dataset", sa.String),
    sa.Column("dataset_sha256", sa.String), sa.Column("config_json", sa.Text), sa.Column("status", sa.String),
    sa.Column("created_at", sa.String), sa.Column("finished_at", sa.String),
)
MAPS = sa.Table(
    "maps", METADATA,
    sa.Column("run_id", sa.String, primary_key=True), sa.Column("perturbation", sa.String, primary_key=True),
    sa.Column("status", sa.String), sa.Column("steps", sa.Integer), sa.Column("best_step", sa.Integer),
    sa.Column("checkpoint", sa.String), sa.Column("error", sa.Text),
)
METRICS = sa.Table(
    "metrics", METADATA,
    sa.Column("run_id", sa.String, primary_key=True), sa.Column("trial_id", sa.String, primary_key=True),
    sa.Column("perturbation", sa.String, primary_key=True), sa.Column("split", sa.String, primary_key=True),
    sa.Column("metric", sa.String, primary_key=True), sa.Column("value", sa.Float),
    sa.Column("step", sa.Integer, primary_key=True),
)
TRIALS = sa.Table(
    "trials", METADATA,
    sa.Column("run_id", sa.String, primary_key=True), sa.Column("trial_id", sa.String, primary_key=True),
    sa.Column("params_json", sa.Text), sa.Column("status", sa.String),
)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def store_url(url_or_path: str) -> str:
    """A SQLAlchemy URL as given, or `sqlite:///PATH` for a plain file path."""
    return url_or_path if "://" in url_or_path else f"sqlite:///{Path(url_or_path).resolve()}"


class Store:
    def __init__(self, url: str) -> None:
        self.url = store_url(url)
        self.engine = sa.create_engine(self.url, connect_args={"timeout": 30} if self.url.startswith("sqlite") else {})
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        METADATA.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- writes -----------------------------------------------------------------------------------
    def _upsert(self, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        """Insert or update by primary key, one transaction; rows grouped by their column set."""
        keys = [c.name for c in table.primary_key.columns]
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(tuple(sorted(row)), []).append(row)
        dialect = self.engine.dialect.name
        with self.engine.begin() as connection:
            for columns, group in groups.items():
                updates = [c for c in columns if c not in keys]
                if dialect in ("sqlite", "postgresql"):
                    insert = (sqlite.insert if dialect == "sqlite" else postgresql.insert)(table)
                    statement = (insert.on_conflict_do_update(index_elements=keys, set_={c: insert.excluded[c] for c in updates})
                                 if updates else insert.on_conflict_do_nothing(index_elements=keys))
                    connection.execute(statement, group)
                else:  # any other database: delete + insert in the same transaction
                    for row in group:
                        connection.execute(table.delete().where(sa.and_(*(table.c[k] == row[k] for k in keys))))
                    connection.execute(table.insert(), group)

    def start_run(self, run_id: str, kind: str, solver: str, dataset: str, dataset_sha256: str, config: dict) -> None:
        self._upsert(RUNS, [{"run_id": run_id, "kind": kind, "solver": solver, "dataset": dataset,
                             "dataset_sha256": dataset_sha256, "config_json": json.dumps(config),
                             "status": "running", "created_at": _now()}])

    def finish_run(self, run_id: str, status: str) -> None:
        self._upsert(RUNS, [{"run_id": run_id, "status": status, "finished_at": _now()}])

    def upsert_maps(self, rows: list[dict[str, Any]]) -> None:
        self._upsert(MAPS, rows)

    def upsert_metrics(self, rows: list[dict[str, Any]]) -> None:
        clean = []
        for row in rows:
            value = row.get("value")
            value = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
            clean.append({"trial_id": "", **row, "value": value})
        self._upsert(METRICS, clean)

    def upsert_trials(self, rows: list[dict[str, Any]]) -> None:
        self._upsert(TRIALS, rows)

    # -- reads ------------------------------------------------------------------------------------
    def _frame(self, statement: sa.Select) -> pd.DataFrame:
        with self.engine.connect() as connection:
            result = connection.execute(statement)
            return pd.DataFrame(result.fetchall(), columns=list(result.keys()))

    def runs(self) -> pd.DataFrame:
        return self._frame(sa.select(RUNS).order_by(RUNS.c.created_at))

    def maps(self, run_id: str) -> pd.DataFrame:
        return self._frame(sa.select(MAPS).where(MAPS.c.run_id == run_id).order_by(MAPS.c.perturbation))

    def metrics(self, run_id: str, split: str | None = None, metric: str | None = None) -> pd.DataFrame:
        query = sa.select(METRICS).where(METRICS.c.run_id == run_id)
        if split is not None:
            query = query.where(METRICS.c.split == split)
        if metric is not None:
            query = query.where(METRICS.c.metric == metric)
        return self._frame(query.order_by(METRICS.c.perturbation, METRICS.c.split, METRICS.c.metric, METRICS.c.step))


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
