"""`train.device`: auto | cpu | cuda | cuda:N, parsed in one place and resolved to a torch device."""
from __future__ import annotations

import re

import torch

from engine.options import DataError

_DEVICE = re.compile(r"(auto|cpu|cuda)(?::([0-9]+))?")


def parse_device(spec: str) -> tuple[str, int | None]:
    """("auto" | "cpu" | "cuda", GPU index or None); a DataError for anything else."""
    match = _DEVICE.fullmatch(str(spec))
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise DataError(f"unknown device {spec!r}; expected auto, cpu, cuda or cuda:N")
    return match.group(1), None if match.group(2) is None else int(match.group(2))


def resolve_device(spec: str) -> torch.device:
    """The torch device of a process that runs the training core itself (benchmarks, a Ray-free
    script, the driver's check before a local Ray run): auto is the first CUDA device if torch sees
    one, else the CPU; cuda / cuda:N is that GPU, or a DataError when torch does not see it."""
    kind, index = parse_device(spec)
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (index or 0) >= count:
        seen = f"{count} CUDA device(s)" if count else "no CUDA device (torch.cuda.is_available() is False)"
        raise DataError(f"device {spec!r} is not available: torch sees {seen}")
    return torch.device("cuda", index or 0)
