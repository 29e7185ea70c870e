"""How every benchmark hands over its result: JSON on stdout, and in a file when asked."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(doc: dict[str, Any], out: Path | None) -> dict[str, Any]:
    """Print doc as indented JSON; also write it to `out` (parents created) when given."""
    text = json.dumps(doc, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return doc
