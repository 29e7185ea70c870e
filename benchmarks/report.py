"""How every benchmark hands over its result: JSON on stdout, and in a file when asked."""
from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import torch


def describe_device(device: torch.device, threads: int) -> dict[str, Any]:
    """What a timing ran on: device type and name (GPU or CPU architecture), torch threads, CPUs, torch."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"type": device.type, "name": name, "torch_threads": threads, "cpu_count": os.cpu_count(), "torch": torch.__version__}


def _json_safe(value: Any) -> Any:
    """NaN / inf (a diverged run) as null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def emit(doc: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """Print doc as indented JSON (NaN as null); also write it to `out` (parents created) when given."""
    text = json.dumps(_json_safe(doc), indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return doc
