"""perturbot: neural optimal-transport maps of single-cell perturbation responses, trained as stacks on Ray."""
from __future__ import annotations

from typing import Any

__all__ = ["FitResult", "fit"]


def __getattr__(name: str) -> Any:  # lazy: `import engine.train` must not pull in Ray or the API
    if name in __all__:
        from engine import api

        return getattr(api, name)
    raise AttributeError(name)
