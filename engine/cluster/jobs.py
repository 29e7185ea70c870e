"""Ray jobs: submit a perturbot command to a cluster's Jobs API, follow it, list / inspect / stop jobs.

The working directory (this checkout) is shipped with the job, so `python -m engine.cli` runs the
submitted code; the cluster's Python must have perturbot's dependencies (cluster.yaml and the
KubeRay image install them), or `install=True` adds them to the job's runtime env (pip).
Token authentication as Ray 2.60 expects it: see `connect`.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

from engine.options import DataError

PROJECT = Path(__file__).resolve().parents[2]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the Jobs API of a head on this machine
TOKEN_FILE = Path.home() / ".ray" / "auth_token"
FINISHED = ("SUCCEEDED", "FAILED", "STOPPED")


def connect(address: str | None) -> Any:
    """A JobSubmissionClient for `address` (default: RAY_ADDRESS if it is http(s), else the local head).

    Token authentication (Ray 2.60): when RAY_AUTH_MODE is unset and a token is at hand
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token as `ray get-auth-token` writes it),
    the client runs in token mode and sends it."""
    token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or TOKEN_FILE.exists()
    if "RAY_AUTH_MODE" not in os.environ and token:
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    env = os.environ.get("RAY_ADDRESS", "")
    address = address or (env if env.startswith("http") else DEFAULT_ADDRESS)
    try:
        return JobSubmissionClient(address)
    except Exception as error:  # unreachable, refused, or an authentication error: one line
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"cannot use the Ray Jobs API at {address}: {type(error).__name__}: {message}") from error


def entrypoint(command: list[str]) -> str:
    """The job's command: `perturbot train|demo|evaluate ...` run from the shipped checkout, joining
    the job's cluster (`--address auto`) unless an address is given."""
    if not command or command[0] not in ("train", "demo", "evaluate"):
        raise DataError("perturbot submit runs `train`, `demo` or `evaluate`: "
                        "perturbot submit --address URL -- train --data ...")
    if command[0] in ("train", "demo") and "--address" not in command:
        command = [*command, "--address", "auto"]
    return " ".join(["python", "-m", "engine.cli", *map(shlex.quote, command)])


def runtime_env(install: bool) -> dict[str, Any]:
    """Ship the checkout (not its run directories, venv or caches); with `install`, pip-install
    perturbot's dependencies into the job's environment."""
    env: dict[str, Any] = {"working_dir": str(PROJECT),
                           "excludes": [".venv", "runs", ".git", "**/__pycache__", "*.h5ad", "*.sqlite*"]}
    if install:
        env["pip"] = [r for r in metadata.requires("perturbot") or [] if "extra ==" not in r]
    return env


def submit(client: Any, command: list[str], install: bool = False, agent_wait_s: float = 120.0) -> str:
    """Submit; a head whose job agent is still starting ("No available agent", a dropped
    connection) is tried again for `agent_wait_s`."""
    deadline = time.monotonic() + agent_wait_s
    job = f"perturbot-{uuid.uuid4().hex[:12]}"  # one id for every try: a retry never starts a second job
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint(command), runtime_env=runtime_env(install), submission_id=job)
        except (RuntimeError, OSError) as error:  # requests' ConnectionError is an OSError
            if "already exists" in str(error):  # an earlier try got through
                return job
            starting = isinstance(error, OSError) or "No available agent" in str(error)
            if not starting or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def follow(client: Any, job_id: str, out: TextIO = sys.stdout) -> str:
    """Stream the job's logs until it ends; its final status."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    return wait(client, job_id)


def wait(client: Any, job_id: str, poll_s: float = 1.0) -> str:
    while (status := str(client.get_job_status(job_id).value)) not in FINISHED:
        time.sleep(poll_s)
    return status
