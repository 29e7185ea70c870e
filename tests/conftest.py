"""Shared fixtures: one Ray for the whole session (started only by tests that need it), data paths."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(relative: str) -> Path:
    """A file of ../shared/data, or skip the test with the reason when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs {path} (the shared datasets beside the repository), which is absent")
    return path


@pytest.fixture
def one_thread():
    """One intra-op thread: faster than 2 on a loaded 2-core machine, and a fixed reduction order."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory: pytest.TempPathFactory):
    """Start a local Ray once per test session (about 3 s), quiet and without auth or dashboard."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_run(ray_session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short demo run (8 CellOT maps, 20 steps) shared by the tests that only read a finished run."""
    from engine.cli import main

    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--out", str(out), "--steps", "20", "--set", "train.eval_every=10"]) == 0
    return out
