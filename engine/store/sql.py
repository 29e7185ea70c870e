"""The metrics store: SQLite by default, any SQLAlchemy URL (e.g. PostgreSQL); SQLAlchemy Core only.

Tables (DESIGN.md "Store tables"): runs, maps, metrics, trials, defined once in `METADATA`. Every write
is an idempotent upsert keyed by the table's primary key, batched in one transaction per call, so a
retried worker never duplicates or loses a row. A row may carry only some columns (e.g. a status
update): the columns it leaves out keep their stored values. A store made by an older version gains
the columns added since (nullable, never keys) when it is opened.
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
from sqlalchemy.schema import CreateTable

METADATA = sa.MetaData()

RUNS = sa.Table(
    "runs",
    METADATA,
    sa.Column("run_id", sa.String, primary_key=True),
    sa.Column("kind", sa.String),
    sa.Column("solver", sa.String),
    sa.Column("dataset", sa.String),
    sa.Column("dataset_sha256", sa.String),
    sa.Column("config_json", sa.Text),
    sa.Column("status", sa.String),
    sa.Column("created_at", sa.String),
    sa.Column("finished_at", sa.String),
)

MAPS = sa.Table(
    "maps",
    METADATA,
    sa.Column("run_id", sa.String, primary_key=True),
    sa.Column("perturbation", sa.String, primary_key=True),
    sa.Column("status", sa.String),
    sa.Column("steps", sa.Integer),
    sa.Column("best_step", sa.Integer),
    sa.Column("checkpoint", sa.String),
    sa.Column("error", sa.Text),
)

METRICS = sa.Table(
    "metrics",
    METADATA,
    sa.Column("run_id", sa.String, primary_key=True),
    sa.Column("trial_id", sa.String, primary_key=True),
    sa.Column("perturbation", sa.String, primary_key=True),
    sa.Column("split", sa.String, primary_key=True),
    sa.Column("metric", sa.String, primary_key=True),
    sa.Column("value", sa.Float),
    sa.Column("step", sa.Integer, primary_key=True),
)

TRIALS = sa.Table(
    "trials",
    METADATA,
    sa.Column("run_id", sa.String, primary_key=True),
    sa.Column("trial_id", sa.String, primary_key=True),
    sa.Column("params_json", sa.Text),
    sa.Column("status", sa.String),
    sa.Column("best_mmd", sa.Float),  # best mean validation mmd over the tuning maps (tune)
    sa.Column("step", sa.Integer),  # last reported step
    sa.Column("error", sa.Text),
)

SQLITE_BUSY_TIMEOUT_MS = 30_000


def store_url(url_or_path: str | Path) -> str:
    """The SQLAlchemy URL as given, or ``sqlite:///ABSOLUTE_PATH`` for a plain filesystem path."""
    text = str(url_or_path)
    return text if "://" in text else f"sqlite:///{Path(text).resolve()}"


def _now() -> str:
    """The current UTC time as an ISO 8601 string."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL journal (readers never block the writer) and a busy timeout, on every new SQLite connection."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def _upsert_statement(dialect: str, table: sa.Table, columns: tuple[str, ...], keep: tuple[str, ...]) -> sa.Insert:
    """``INSERT ... ON CONFLICT (primary key) DO UPDATE SET`` the given non-key columns but ``keep``.

    ``dialect`` is "sqlite" or "postgresql" (both spell the upsert the same way).
    """
    insert = (sqlite.insert if dialect == "sqlite" else postgresql.insert)(table)
    keys = [column.name for column in table.primary_key.columns]
    updates = [c for c in columns if c not in keys and c not in keep]
    if not updates:
        return insert.on_conflict_do_nothing(index_elements=keys)
    return insert.on_conflict_do_update(index_elements=keys, set_={c: insert.excluded[c] for c in updates})


def _add_missing_columns(connection: sa.Connection, table: sa.Table) -> None:
    """ALTER TABLE ... ADD COLUMN for the columns of `table` that a store made by an older version lacks."""
    present = {column["name"] for column in sa.inspect(connection).get_columns(table.name)}
    for column in table.columns:
        if column.name not in present:
            kind = column.type.compile(dialect=connection.dialect)
            connection.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')


class Store:
    """Runs, maps, metrics and trials in one SQL database; tables are created when missing.

    ``url`` is any SQLAlchemy URL or a plain file path (SQLite; its directory is created).
    """

    def __init__(self, url: str | Path) -> None:
        self.url = store_url(url)
        parsed = sa.engine.make_url(self.url)
        is_sqlite = parsed.get_backend_name() == "sqlite"
        if is_sqlite and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine = sa.create_engine(self.url)
        if is_sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._native_upsert = self.engine.dialect.name in ("sqlite", "postgresql")
        with self.engine.begin() as connection:  # IF NOT EXISTS: safe when several processes start at once
            for table in METADATA.sorted_tables:
                connection.execute(CreateTable(table, if_not_exists=True))
                _add_missing_columns(connection, table)

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # writes ---------------------------------------------------------------------------------------

    def _upsert(self, table: sa.Table, rows: list[dict[str, Any]], keep: tuple[str, ...] = ()) -> None:
        """Insert rows or update the stored row with the same primary key, in one transaction.

        Rows are grouped by their column set; only the columns a row carries are written, and the
        ``keep`` columns are written on insert but never overwritten.
        """
        keys = [column.name for column in table.primary_key.columns]
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(tuple(sorted(row)), []).append(row)
        with self.engine.begin() as connection:
            for columns, group in groups.items():
                if self._native_upsert:
                    connection.execute(_upsert_statement(self.engine.dialect.name, table, columns, keep), group)
                    continue
                for row in group:  # any other database: delete + insert, merged with the stored row
                    match = sa.and_(*(table.c[k] == row[k] for k in keys))
                    stored = connection.execute(sa.select(table).where(match)).mappings().first()
                    merged = dict(row)
                    if stored is not None:
                        merged = {**stored, **row, **{c: stored[c] for c in keep}}
                        connection.execute(table.delete().where(match))
                    connection.execute(table.insert(), merged)

    def start_run(
        self, run_id: str, kind: str, solver: str, dataset: str, dataset_sha256: str, config: dict[str, Any]
    ) -> None:
        """Record a run as "running" (created_at: UTC ISO time of the first start, kept on a restart)."""
        row = {
            "run_id": run_id,
            "kind": kind,
            "solver": solver,
            "dataset": dataset,
            "dataset_sha256": dataset_sha256,
            "config_json": json.dumps(config, sort_keys=True),
            "status": "running",
            "created_at": _now(),
            "finished_at": None,
        }
        self._upsert(RUNS, [row], keep=("created_at",))

    def restart_run(self, run_id: str) -> None:
        """Mark a stopped run "running" again (it is being resumed); created_at is kept."""
        self._upsert(RUNS, [{"run_id": run_id, "status": "running", "finished_at": None}])

    def finish_run(self, run_id: str, status: str) -> None:
        """Set a run's final status and finished_at (UTC ISO time)."""
        self._upsert(RUNS, [{"run_id": run_id, "status": status, "finished_at": _now()}])

    def upsert_maps(self, rows: list[dict[str, Any]]) -> None:
        """Rows of (run_id, perturbation, [status, steps, best_step, checkpoint, error])."""
        self._upsert(MAPS, rows)

    def upsert_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rows of (run_id, [trial_id], perturbation, split, metric, value, step).

        A missing trial_id is "" (not a tune run); values are stored as floats, NaN as NULL.
        """
        clean = []
        for row in rows:
            value = row["value"]
            value = None if value is None or math.isnan(float(value)) else float(value)
            clean.append({"trial_id": "", **row, "value": value})
        self._upsert(METRICS, clean)

    def upsert_trials(self, rows: list[dict[str, Any]]) -> None:
        """Rows of (run_id, trial_id, [params_json, status, best_mmd, step, error])."""
        self._upsert(TRIALS, rows)

    def delete_trial_metrics(self, run_id: str, trial_id: str) -> None:
        """Forget a trial's metric rows (it starts again from its first step)."""
        with self.engine.begin() as connection:
            connection.execute(METRICS.delete().where((METRICS.c.run_id == run_id) & (METRICS.c.trial_id == trial_id)))

    # reads ----------------------------------------------------------------------------------------

    def _frame(self, query: sa.Select) -> pd.DataFrame:
        with self.engine.connect() as connection:
            result = connection.execute(query)
            return pd.DataFrame(result.all(), columns=list(result.keys()))

    def runs(self) -> pd.DataFrame:
        """All runs, oldest first."""
        return self._frame(sa.select(RUNS).order_by(RUNS.c.created_at, RUNS.c.run_id))

    def maps(self, run_id: str) -> pd.DataFrame:
        """The maps of one run, by perturbation name."""
        return self._frame(sa.select(MAPS).where(MAPS.c.run_id == run_id).order_by(MAPS.c.perturbation))

    def map_statuses(self) -> pd.DataFrame:
        """How many maps of each run are in each status (columns run_id, status, maps)."""
        query = sa.select(MAPS.c.run_id, MAPS.c.status, sa.func.count().label("maps")).group_by(MAPS.c.run_id, MAPS.c.status)
        return self._frame(query)

    def trials(self, run_id: str) -> pd.DataFrame:
        """The tune trials of one run, by trial id."""
        return self._frame(sa.select(TRIALS).where(TRIALS.c.run_id == run_id).order_by(TRIALS.c.trial_id))

    def metrics(self, run_id: str, split: str | None = None, metric: str | None = None) -> pd.DataFrame:
        """Metric rows of one run, optionally of one split and/or metric; NULL values read as NaN."""
        query = sa.select(METRICS).where(METRICS.c.run_id == run_id)
        if split is not None:
            query = query.where(METRICS.c.split == split)
        if metric is not None:
            query = query.where(METRICS.c.metric == metric)
        order = [METRICS.c[c] for c in ("trial_id", "perturbation", "split", "metric", "step")]
        frame = self._frame(query.order_by(*order))
        frame["value"] = frame["value"].astype(float)
        return frame
