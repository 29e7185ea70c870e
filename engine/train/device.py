"""Which torch device the training core runs on (`train.device`: auto | cpu | cuda | cuda:N)."""
from __future__ import annotations

import torch

from engine.options import DataError


def resolve_device(spec: str) -> torch.device:
    """auto: the first CUDA device if torch sees one, else the CPU; cpu; cuda or cuda:N: that GPU,
    or a DataError (exit code 2 in the CLI) when torch sees no such device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not spec.startswith("cuda"):
        raise DataError(f"unknown device {spec!r}; expected auto, cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(spec.partition(":")[2] or 0)
    if index >= count:
        seen = f"{count} CUDA device(s)" if count else "no CUDA device (torch.cuda.is_available() is False)"
        raise DataError(f"device {spec!r} is not available: torch sees {seen}")
    return torch.device("cuda", index)
