"""Ray jobs: submit a perturbot command to a cluster's Jobs API, follow it, list / inspect / stop jobs.

The working directory (this checkout) is shipped with the job, so `python -m engine.cli` runs the
submitted code; the cluster's Python must have perturbot's dependencies (cluster.yaml and the
KubeRay image install them), or `install=True` adds them to the job's runtime env (pip).
Token authentication is Ray 2.60's default: the client sends the token of `ray get-auth-token`
(~/.ray/auth_token, or RAY_AUTH_TOKEN) when RAY_AUTH_MODE=token, which `connect` sets unless the
environment says otherwise.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

from engine.options import DataError

PROJECT = Path(__file__).resolve().parents[2]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the Jobs API of a head on this machine
FINISHED = ("SUCCEEDED", "FAILED", "STOPPED")


def connect(address: str | None) -> Any:
    """A JobSubmissionClient for `address` (default: RAY_ADDRESS if it is http(s), else the local head)."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    env = os.environ.get("RAY_ADDRESS", "")
    address = address or (env if env.startswith("http") else DEFAULT_ADDRESS)
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise DataError(f"cannot reach the Ray Jobs API at {address}: {error}") from error


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


def submit(client: Any, command: list[str], install: bool = False) -> str:
    return client.submit_job(entrypoint=entrypoint(command), runtime_env=runtime_env(install))


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
