"""The layout of a run directory, in one place (DESIGN.md "Run directory").

    config.yaml              the fully resolved RunConfig (a search: its base config)
    run.json                 {"run_id", "store", "kind"}  (kind: train | tune)
    search.yaml              a search's settings and space (tune)
    best.yaml                a search's best configuration, for `perturbot train --config` (tune)
    data/                    the prepared Arrow cell tables, embedding and markers
    checkpoints/             stack-*.train.pt (resume), stack-*.maps.pt (the best maps, final)
    predictions/             stack-*.npz (held-out controls of each map, predicted)
    predictions.h5ad         all of them, one row per predicted cell and map
    metrics.sqlite           the default store
    ray/                     Ray Train's (or Tune's) storage_path
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def default_run_dir(prefix: str = "") -> Path:
    """runs/<prefix><date-time> under the working directory."""
    return Path("runs") / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    """Paths of one run directory; nothing else in the engine spells them out."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def info(self) -> Path:
        return self.root / "run.json"

    @property
    def search(self) -> Path:
        return self.root / "search.yaml"

    @property
    def best_config(self) -> Path:
        return self.root / "best.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.h5ad"

    @property
    def ray_storage(self) -> Path:
        return (self.root / "ray").resolve()

    @property
    def default_store(self) -> str:
        return f"sqlite:///{(self.root / 'metrics.sqlite').resolve()}"

    def has_default_store(self) -> bool:
        return (self.root / "metrics.sqlite").is_file()

    def exists(self) -> bool:
        return self.info.exists()

    def train_checkpoint(self, stack: str) -> Path:
        return self.root / "checkpoints" / f"{stack}.train.pt"

    def maps_file(self, stack: str) -> Path:
        return self.root / "checkpoints" / f"{stack}.maps.pt"

    def saved_maps(self) -> list[Path]:
        """Every finished stack's maps file, in a stable order."""
        return sorted((self.root / "checkpoints").glob("*.maps.pt"))

    def stack_predictions(self, stack: str) -> Path:
        return self.root / "predictions" / f"{stack}.npz"

    def all_stack_predictions(self) -> list[Path]:
        return sorted((self.root / "predictions").glob("*.npz"))

    def write_info(self, run_id: str, store_url: str, kind: str = "train") -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.info.write_text(json.dumps({"run_id": run_id, "store": store_url, "kind": kind}))

    def read_info(self) -> dict[str, str]:
        return json.loads(self.info.read_text())
