"""engine.storage: a storage location on any pyarrow filesystem (the end-to-end run through one is in
test_pipeline.py, whose storage is a recording filesystem)."""
from __future__ import annotations

import pickle

import pyarrow.fs as pafs
import pytest

from engine.options import DataError
from engine.rundir import RunDir
from engine.storage import StoragePath, as_storage


def test_paths_and_file_uris_are_local_and_other_filesystems_are_not(tmp_path):
    for given in (tmp_path / "s", str(tmp_path / "s"), f"file://{tmp_path}/s"):
        location = as_storage(given)
        assert location.local == tmp_path / "s" and str(location) == str(tmp_path / "s")
    subtree = StoragePath(pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), "runs/x", "sub://")
    assert subtree.local is None and str(subtree / "data") == "sub://runs/x/data"
    assert (subtree / "a").parent == subtree and (subtree / "a").name == "a"
    with pytest.raises(DataError, match="nosuch://"):
        as_storage("nosuch://bucket/x")


def test_files_are_written_whole_listed_and_read_back_through_the_filesystem(tmp_path):
    root = StoragePath(pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), "store")
    assert not root.exists() and root.glob("*.pt") == []
    (root / "checkpoints" / "b.pt").write_bytes(b"second")
    (root / "checkpoints" / "a.pt").write_bytes(b"first")
    (root / "checkpoints" / "c.npz").write_text("other")
    assert [p.name for p in (root / "checkpoints").glob("*.pt")] == ["a.pt", "b.pt"]  # sorted, no .tmp left
    assert sorted(p.name for p in (tmp_path / "store" / "checkpoints").iterdir()) == ["a.pt", "b.pt", "c.npz"]
    assert (root / "checkpoints" / "a.pt").read_bytes() == b"first" and (root / "checkpoints").exists()
    assert not (root / "checkpoints").is_file() and (root / "checkpoints" / "c.npz").is_file()
    again = pickle.loads(pickle.dumps(root / "checkpoints" / "b.pt"))  # how Ray workers receive it
    assert again.read_bytes() == b"second" and again == root / "checkpoints" / "b.pt"


def test_a_run_records_a_storage_elsewhere_and_finds_it_again(tmp_path):
    run = RunDir(tmp_path / "run", storage=f"file://{tmp_path}/shared")
    run.write_info("r1", "sqlite://")
    assert RunDir(tmp_path / "run").storage.local == tmp_path / "shared"
    own = RunDir(tmp_path / "own")
    own.write_info("r2", "sqlite://")
    assert own.read_info()["storage"] is None and RunDir(tmp_path / "own").data.local == tmp_path / "own" / "data"
