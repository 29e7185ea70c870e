"""How every benchmark hands over its result: JSON on stdout, and in a file when asked."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


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
