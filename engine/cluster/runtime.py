"""Starting or joining Ray: the embedded default is an in-process local Ray."""
from __future__ import annotations

import os

import ray


def connect(address: str = "local", num_cpus: int | None = None) -> None:
    """`local`: start Ray in this process (no dashboard, no auth token); otherwise join `address`."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    if address == "local":
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
        # worker logs stay in the Ray session dir; failures reach the user through the store (maps.error)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address)
