"""`perturbot submit` and `perturbot jobs` against a real head: `ray start --head` on loopback with
token authentication (RAY_AUTH_MODE=token; the token in RAY_AUTH_TOKEN, so ~/.ray is left alone), a
small demo job submitted through the Jobs API, which must SUCCEED with its rows in the store; a
client without the token is refused in one line. Slow: a head and a job take a minute or more here."""
from __future__ import annotations

import os
import secrets
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from engine.api import FitResult


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (all held open while choosing, so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


TOKEN = secrets.token_hex(16)


def _perturbot(*args: str, timeout: float = 900, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_USAGE_STATS_ENABLED="0", **({"RAY_AUTH_TOKEN": token} if token else {}))
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def head():
    """A Ray head of its own on loopback (its own ports and temp dir; stopped by its own pid)."""
    temp = tempfile.mkdtemp(prefix="/tmp/pb-head-")
    gcs, dashboard, *agents = _free_ports(7)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
           # a job's `python` is the head's (as on a cluster where the environment is on PATH)
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
         # ports of its own: other Rays on this machine hold the defaults (the job agent's 52365 above all)
         *(f"--{name}={port}" for name, port in zip(("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                      "runtime-env-agent-port", "metrics-export-port",
                                                      "ray-client-server-port"), agents)),
         f"--temp-dir={temp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 300
        while _perturbot("jobs", "list", "--address", url, timeout=120).returncode != 0:
            assert process.poll() is None and time.time() < deadline, "the head did not start"
            time.sleep(2)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the head's processes, nothing else
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_submit_a_small_job_to_a_local_head_succeeds_with_rows_in_the_store(head, tmp_path):
    out = tmp_path / "run"
    done = _perturbot("submit", "--address", head, "--", "demo", "--steps", "10", "--workers", "1",
                      "--set", "train.eval_every=5", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job = done.stdout.splitlines()[0].removeprefix("job ")
    assert f"job {job}: SUCCEEDED" in done.stderr
    assert "8 maps" in done.stdout  # the job's own output, streamed
    result = FitResult.load(out)
    assert (result.maps()["status"] == "trained").all() and len(result.maps()) == 8
    assert len(result.metrics(split="test")) > 0
    listed = _perturbot("jobs", "list", "--address", head)
    assert job in listed.stdout and "SUCCEEDED" in listed.stdout
    assert _perturbot("jobs", "status", job, "--address", head).stdout.strip().startswith(f"{job}: SUCCEEDED")
    assert "8 maps" in _perturbot("jobs", "logs", job, "--address", head).stdout
    assert "already finished" in _perturbot("jobs", "stop", job, "--address", head).stdout
    refused = _perturbot("submit", "--address", head, "--", "predict", "--run", str(out))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    stranger = _perturbot("jobs", "list", "--address", head, token=secrets.token_hex(16), timeout=300)
    assert stranger.returncode == 2 and stranger.stderr.count("\n") == 1, stranger.stderr
