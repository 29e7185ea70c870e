"""Train/test splits of cells, per (group, condition) (CellOT conventions)."""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd


def pair_indices(groups: np.ndarray, conditions: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """Sorted row indices of every (group, condition) pair present in the two label arrays."""
    frame = pd.DataFrame({"group": groups, "condition": conditions})
    return {key: np.asarray(idx) for key, idx in frame.groupby(["group", "condition"], sort=True).indices.items()}


def split_test_cells(
    pairs: dict[tuple[str, str], np.ndarray],
    n_cells: int,
    test_fraction: float,
    seed: int,
    holdout: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean [n_cells], True for test cells.

    i.i.d.: in each (group, condition) of n cells, round(test_fraction * n) cells (at least 1 and at
    most n - 1 when n >= 2) drawn by a generator seeded with (seed, crc32(group, condition)), so a
    pair's split does not depend on which other pairs are present.
    o.o.s. / o.o.d.: with a ``holdout`` mask, exactly the holdout cells are the test split.
    """
    if holdout is not None:
        return holdout.copy()
    is_test = np.zeros(n_cells, dtype=bool)
    for (group, condition), idx in pairs.items():
        n = len(idx)
        n_test = min(max(int(np.floor(test_fraction * n + 0.5)), 1), n - 1) if n >= 2 else 0
        rng = np.random.default_rng([seed, zlib.crc32(f"{group}\0{condition}".encode())])
        is_test[rng.choice(idx, size=n_test, replace=False)] = True
    return is_test
