"""Checkpoints are plain dicts of tensors, numbers and strings (no pickled classes), written atomically.

They load with `torch.load(weights_only=True)`, so they survive code changes and never execute code.
They go through engine.storage, so a checkpoint may live on a local disk or in an object store.
"""
from __future__ import annotations

import io
from typing import Any

import torch

from engine.storage import PathLike, as_storage, to_bytes


def save_checkpoint(path: PathLike, payload: dict[str, Any]) -> None:
    """Write payload whole (engine.storage: via a temporary file and a move; a crash never leaves half a file)."""
    as_storage(path).write_bytes(to_bytes(lambda f: torch.save(payload, f)))


def load_checkpoint(path: PathLike, device: torch.device | str = "cpu") -> dict[str, Any]:
    return torch.load(io.BytesIO(as_storage(path).read_bytes()), map_location=device, weights_only=True)
