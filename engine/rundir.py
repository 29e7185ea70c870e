"""The layout of a run directory, in one place (DESIGN.md "Run directory").

    config.yaml              the fully resolved RunConfig (a search: its base config)
    run.json                 {"run_id", "store", "storage", "kind"}  (kind: train | tune)
    search.yaml              a search's settings and space (tune)
    best.yaml                a search's best configuration, for `perturbot train --config` (tune)
    predictions.h5ad         every map's held-out controls, predicted (one row per cell and map)
    metrics.sqlite           the default store

and, in the run's storage location (the run directory itself unless `--storage` names another
place: on a cluster, a path every node mounts, or an object store, s3:// or gs://; engine.storage),
everything the workers read and write:

    data/                    the prepared Arrow cell tables, embedding and markers
    checkpoints/             stack-*.train.pt (resume), stack-*.maps.pt (the best maps, final)
    predictions/             stack-*.npz (held-out controls of each map, predicted)
    ray/                     Ray Train's (or Tune's) storage_path
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from engine.storage import PathLike, StoragePath, as_storage


def default_run_dir(prefix: str = "") -> Path:
    """runs/<prefix><date-time> under the working directory."""
    return Path("runs") / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}"


class RunDir:
    """Paths of one run directory and its storage location; nothing else in the engine spells them out.

    `storage` defaults to the one recorded in run.json, else the run directory itself."""

    def __init__(self, root: str | Path, storage: PathLike | None = None) -> None:
        self.root = Path(root)
        if storage is None and self.info.exists():
            storage = self.read_info().get("storage")
        self.storage: StoragePath = as_storage(self.root if storage is None else storage)

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
    def data(self) -> StoragePath:
        return self.storage / "data"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.h5ad"

    @property
    def ray_storage(self) -> StoragePath:
        return self.storage / "ray"

    @property
    def default_store(self) -> str:
        return f"sqlite:///{(self.root / 'metrics.sqlite').resolve()}"

    def has_default_store(self) -> bool:
        return (self.root / "metrics.sqlite").is_file()

    def exists(self) -> bool:
        return self.info.exists()

    def train_checkpoint(self, stack: str) -> StoragePath:
        return self.storage / "checkpoints" / f"{stack}.train.pt"

    def maps_file(self, stack: str) -> StoragePath:
        return self.storage / "checkpoints" / f"{stack}.maps.pt"

    def saved_maps(self) -> list[StoragePath]:
        """Every finished stack's maps file, in a stable order."""
        return (self.storage / "checkpoints").glob("*.maps.pt")

    def stack_predictions(self, stack: str) -> StoragePath:
        return self.storage / "predictions" / f"{stack}.npz"

    def all_stack_predictions(self) -> list[StoragePath]:
        return (self.storage / "predictions").glob("*.npz")

    def write_info(self, run_id: str, store_url: str, kind: str = "train") -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        own = self.storage.local == self.root.resolve()  # the default: not recorded, so a copied run reads its own files
        self.info.write_text(json.dumps({"run_id": run_id, "store": store_url, "kind": kind,
                                         "storage": None if own else str(self.storage)}))

    def read_info(self) -> dict[str, str]:
        return json.loads(self.info.read_text())
