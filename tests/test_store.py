"""The metrics store on SQLite files: tables, idempotent upserts, frames, two writers on one file."""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from engine.store import Store, store_url
from engine.store import sql
from engine.store.sql import METRICS, _upsert_statement

TABLES = {
    "runs": (["run_id"], ["kind", "solver", "dataset", "dataset_sha256", "config_json", "status", "created_at",
                          "finished_at"]),
    "maps": (["run_id", "perturbation"], ["status", "steps", "best_step", "checkpoint", "error"]),
    "metrics": (["run_id", "trial_id", "perturbation", "split", "metric", "step"], ["value"]),
    "trials": (["run_id", "trial_id"], ["params_json", "status", "best_mmd", "step", "error"]),
}


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "runs" / "metrics.sqlite") as opened:
        yield opened


def _metric(perturbation: str, metric: str, value: float, step: int = 100, **extra) -> dict:
    return {"run_id": "r1", "perturbation": perturbation, "split": "test", "metric": metric, "value": value,
            "step": step, **extra}


def test_plain_path_becomes_a_sqlite_url_in_wal_mode(tmp_path: Path, store: Store):
    assert store_url(tmp_path / "a.sqlite") == f"sqlite:///{(tmp_path / 'a.sqlite').resolve()}"
    assert store_url("postgresql://u@host/db") == "postgresql://u@host/db"
    assert (tmp_path / "runs" / "metrics.sqlite").exists()
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000


def test_tables_are_created_with_their_primary_keys(store: Store, tmp_path: Path):
    inspector = sa.inspect(store.engine)
    assert set(inspector.get_table_names()) == set(TABLES)
    for table, (keys, others) in TABLES.items():
        assert inspector.get_pk_constraint(table)["constrained_columns"] == keys
        assert {c["name"] for c in inspector.get_columns(table)} == set(keys) | set(others)
    Store(store.url).close()  # opening an existing store again keeps it


def test_runs_start_finish_and_restart(store: Store, monkeypatch: pytest.MonkeyPatch):
    store.start_run("r1", "train", "cellot", "kang.h5ad", "ab" * 32, {"steps": 10, "lr": 1e-4})
    store.start_run("r0", "tune", "w1ot", "cytof.h5ad", "cd" * 32, {})
    runs = store.runs()
    assert list(runs.columns) == ["run_id", *TABLES["runs"][1]]
    assert set(runs["run_id"]) == {"r0", "r1"}
    first = runs.set_index("run_id").loc["r1"]
    assert first["status"] == "running" and first["finished_at"] is None
    assert first["config_json"] == '{"lr": 0.0001, "steps": 10}'
    assert datetime.fromisoformat(first["created_at"]).utcoffset().total_seconds() == 0

    store.finish_run("r1", "finished")
    done = store.runs().set_index("run_id").loc["r1"]
    assert done["status"] == "finished" and done["solver"] == "cellot"
    assert datetime.fromisoformat(done["finished_at"]) >= datetime.fromisoformat(done["created_at"])

    monkeypatch.setattr(sql, "_now", lambda: "2100-01-01T00:00:00+00:00")
    store.start_run("r1", "train", "cellot", "kang.h5ad", "ab" * 32, {"steps": 20})  # a resumed run
    again = store.runs().set_index("run_id").loc["r1"]
    assert again["status"] == "running" and again["finished_at"] is None
    assert again["created_at"] == first["created_at"] and again["config_json"] == '{"steps": 20}'
    assert len(store.runs()) == 2


def test_metric_upsert_twice_updates_without_duplicates(store: Store):
    rows = [_metric("drugA", "mmd", 0.5), _metric("drugA", "l2_means", 1.5), _metric("drugB", "mmd", 0.25)]
    store.upsert_metrics(rows)
    store.upsert_metrics(rows[:1] + [_metric("drugB", "mmd", 0.75)])
    frame = store.metrics("r1")
    assert len(frame) == 3
    assert list(frame.columns) == ["run_id", "trial_id", "perturbation", "split", "metric", "value", "step"]
    values = frame.set_index(["perturbation", "metric"])["value"]
    assert values["drugA", "mmd"] == 0.5 and values["drugB", "mmd"] == 0.75
    assert (frame["trial_id"] == "").all()


def test_metric_values_nan_as_null_filters_and_trials(store: Store):
    import numpy as np

    store.upsert_metrics([
        _metric("drugA", "mmd", np.float32(0.5)),
        _metric("drugA", "mmd", float("nan"), step=200),
        _metric("drugA", "mmd", 0.4, split="valid"),
        _metric("drugA", "mmd", 0.3, trial_id="t7"),
        {**_metric("drugB", "energy", 2.0), "run_id": "other"},
    ])
    with store.engine.connect() as connection:
        nulls = connection.execute(sa.select(sa.func.count()).where(METRICS.c.value.is_(None))).scalar()
    assert nulls == 1
    frame = store.metrics("r1", split="test", metric="mmd")
    assert frame["value"].dtype == float and len(frame) == 3
    assert frame[frame["trial_id"] == ""]["step"].tolist() == [100, 200]
    assert np.isnan(frame.set_index(["trial_id", "step"])["value"]["", 200])
    assert store.metrics("r1", split="valid")["value"].tolist() == [pytest.approx(0.4)]
    assert store.metrics("missing").empty and list(store.metrics("missing").columns) == list(frame.columns)

    store.upsert_trials([{"run_id": "r1", "trial_id": "t7", "params_json": '{"lr": 0.001}', "status": "running"}])
    store.upsert_trials([{"run_id": "r1", "trial_id": "t7", "status": "terminated"}])
    trials = store.trials("r1")
    assert trials[["trial_id", "params_json", "status"]].values.tolist() == [["t7", '{"lr": 0.001}', "terminated"]]
    store.delete_trial_metrics("r1", "t7")  # a trial that starts again drops its earlier rows, and only those
    assert "t7" not in set(store.metrics("r1")["trial_id"]) and len(store.metrics("r1")) == 3


def test_a_store_of_an_older_version_gains_the_new_columns(tmp_path: Path):
    """A trials table made before best_mmd, step and error existed keeps its rows and gets them."""
    path = tmp_path / "old.sqlite"
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE trials (run_id VARCHAR NOT NULL, trial_id VARCHAR NOT NULL, "
                                   "params_json TEXT, status VARCHAR, PRIMARY KEY (run_id, trial_id))")
        connection.exec_driver_sql("INSERT INTO trials VALUES ('r0', 't0', '{}', 'finished')")
    engine.dispose()
    with Store(path) as store:
        store.upsert_trials([{"run_id": "r0", "trial_id": "t1", "status": "stopped", "best_mmd": 0.25, "step": 10}])
        trials = store.trials("r0")
        assert list(trials.columns) == ["run_id", "trial_id", *TABLES["trials"][1]]
        assert trials[["trial_id", "status", "best_mmd"]].values.tolist()[1] == ["t1", "stopped", 0.25]
        assert trials[["trial_id", "params_json", "status"]].values.tolist()[0] == ["t0", "{}", "finished"]
    Store(path).close()  # opening it again changes nothing


def test_map_rows_update_only_the_columns_they_carry(store: Store):
    store.upsert_maps([{"run_id": "r1", "perturbation": p, "status": "running"} for p in ("b", "a")])
    store.upsert_maps([{"run_id": "r1", "perturbation": "a", "status": "trained", "steps": 500, "best_step": 400,
                        "checkpoint": "checkpoints/s0.maps.pt"}])
    store.upsert_maps([{"run_id": "r1", "perturbation": "a", "status": "evaluated"}])
    maps = store.maps("r1")
    assert maps["perturbation"].tolist() == ["a", "b"]
    a = maps.iloc[0]
    assert (a["status"], a["steps"], a["best_step"]) == ("evaluated", 500, 400)
    assert a["checkpoint"] == "checkpoints/s0.maps.pt"
    assert maps.iloc[1]["status"] == "running" and maps.iloc[1]["error"] is None


def test_generic_delete_insert_path_matches_the_native_upsert(store: Store, monkeypatch: pytest.MonkeyPatch):
    store._native_upsert = False  # the path taken by databases other than SQLite and PostgreSQL
    store.start_run("r1", "train", "w1ot", "d", "00", {})
    created = store.runs()["created_at"][0]
    monkeypatch.setattr(sql, "_now", lambda: "2100-01-01T00:00:00+00:00")
    store.upsert_maps([{"run_id": "r1", "perturbation": "a", "status": "running", "steps": 10}])
    store.upsert_maps([{"run_id": "r1", "perturbation": "a", "status": "trained"}])
    store.upsert_metrics([_metric("a", "mmd", 0.5), _metric("a", "mmd", 0.25)])
    store.start_run("r1", "train", "w1ot", "d", "00", {"again": True})
    assert store.maps("r1")[["status", "steps"]].values.tolist() == [["trained", 10]]
    assert store.metrics("r1")["value"].tolist() == [0.25]
    assert store.runs()["created_at"][0] == created and len(store.runs()) == 1


def test_postgresql_upsert_statement():
    statement = _upsert_statement("postgresql", METRICS, ("metric", "perturbation", "run_id", "split", "step",
                                                          "trial_id", "value"), ())
    sql = str(statement.compile(dialect=postgresql.dialect()))
    conflict = "ON CONFLICT (run_id, trial_id, perturbation, split, metric, step)"
    assert f"{conflict} DO UPDATE SET value = excluded.value" in sql


def test_two_stores_on_one_file_write_concurrently(tmp_path: Path):
    path = tmp_path / "shared.sqlite"
    stores = [Store(path), Store(str(path))]
    errors: list[BaseException] = []

    def write(writer: int) -> None:
        try:
            for batch in range(15):
                rows = [_metric(f"p{writer}_{batch}", f"m{i}", float(i), step=batch) for i in range(20)]
                stores[writer].upsert_metrics(rows)
                stores[writer].upsert_metrics(rows[:5])  # a retried batch
                stores[writer].upsert_maps([{"run_id": "r1", "perturbation": f"p{writer}_{batch}", "status": "done"}])
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    frame = stores[0].metrics("r1")
    assert len(frame) == 2 * 15 * 20
    assert not frame.duplicated(["perturbation", "metric", "step"]).any()
    assert len(stores[1].maps("r1")) == 30
    for opened in stores:
        opened.close()
