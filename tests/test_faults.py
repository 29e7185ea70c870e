"""Faults: a map that fails for its own reason fails alone; and on a fake multi-node cluster
(tests/fault_cluster.py, a Ray of its own in a subprocess) a killed worker, a removed node, a killed
shard store and a killed driver (then `--resume`) all end with every map finished, resumed from its
last checkpoint (not from step 0), and exactly one final row set per map. Before each fault, every
training node holds its own workers' cells only, in a shard store on that node."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.api import FitResult
from engine.config import RunConfig
from engine.data import PreparedData, prepare
from engine.rundir import RunDir
from engine.store import Store
from engine.train.worker import MapRun, train_maps

FAULT_SCRIPT = Path(__file__).with_name("fault_cluster.py")
sys.path.insert(0, str(FAULT_SCRIPT.parent))
from fault_cluster import BAD_MAP, write_data  # noqa: E402


class StoreReporter:
    """The worker's reporter writing straight to a store (no Ray)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def metrics(self, rows: list[dict]) -> None:
        self.store.upsert_metrics(rows)

    def maps(self, rows: list[dict]) -> None:
        self.store.upsert_maps(rows)

    def progress(self, stack: str, done: int) -> bool:
        return False


def test_a_map_that_fails_on_its_own_fails_alone(tmp_path, one_thread):
    """Cells that overflow float32 sink one map (failed, with its error); the others are trained."""
    path = tmp_path / "cells.h5ad"
    write_data(path)
    import anndata as ad

    config = RunConfig.resolve(dataset=str(path), condition_key="condition", control="control", split_by="group",
                               steps=4, train_params={"stack_size": 1, "eval_every": 2})
    prepared = prepare(ad.read_h5ad(path), config.data)
    with Store(tmp_path / "m.sqlite") as store:
        run = MapRun(prepared, config, RunDir(tmp_path / "run"), StoreReporter(store), torch.device("cpu"), "r")
        train_maps(run, [k for k in prepared.maps if k.name in (BAD_MAP, "g1/pert0")])
        maps = store.maps("r").set_index("perturbation")
    assert maps.loc[BAD_MAP, "status"] in ("failed", "diverged") and maps.loc[BAD_MAP, "error"]
    assert maps.loc["g1/pert0", "status"] == "trained" and len(maps) == 2


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["worker", "node", "shards", "driver"])
def test_a_fault_mid_run_loses_nothing(fault, tmp_path):
    done = subprocess.run([sys.executable, str(FAULT_SCRIPT), fault, str(tmp_path)], capture_output=True,
                          text=True, timeout=1200)
    (tmp_path / "stderr.log").write_text(done.stderr)
    driver = [line for line in done.stderr.splitlines() if not line.lstrip().startswith(("\x1b", "("))]
    assert done.returncode == 0, "\n".join(driver[-60:])  # the driver's own traceback, not its actors' log lines
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["injected"], report
    result = FitResult.load(tmp_path / "run")
    placed = report["placement"]  # each training node reads its own workers' cells into a store on it
    n_tables = len(PreparedData.load(result.dir.data, tables=()).table_rows)
    assert sorted(s["node"] for s in placed["stores"]) == placed["worker_nodes"], placed
    assert all(s["node"] == s["named_for"] and 0 < s["tables"] < n_tables for s in placed["stores"]), placed
    assert placed["driver_actors_on_worker_nodes"] == [], placed
    maps = result.maps().set_index("perturbation")
    assert len(maps) == 6
    assert maps.loc[BAD_MAP, "status"] in ("failed", "diverged") and maps.loc[BAD_MAP, "error"]
    assert (maps.drop(BAD_MAP)["status"] == "trained").all(), maps
    resumed = result.metrics(metric="resumed_from")
    assert len(resumed) > 0 and (resumed["value"] > 0).all(), "the restarted stacks resumed from a checkpoint"
    final = result.metrics()
    final = final[final["split"].str.startswith("test") & (final["perturbation"] != BAD_MAP)]
    assert (final.groupby(["perturbation", "split", "metric"]).size() == 1).all()
    assert final["perturbation"].nunique() == 5 and final.groupby("perturbation").size().nunique() == 1
    with Store(result.store_url) as store:  # a diverged map is finished (frozen at its best state), a failed one not
        expected = "finished" if maps.loc[BAD_MAP, "status"] == "diverged" else "partial"
        assert store.runs()["status"].item() == expected
