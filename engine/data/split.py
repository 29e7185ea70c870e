"""Train/valid/test splits of cells, per (group, condition) (CellOT conventions, plus a valid split).

A split is an int8 array with one code per cell: TRAIN (0), VALID (1) or TEST (2); ``SPLITS[code]``
is the split's name.
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

SPLITS = ("train", "valid", "test")  # indexed by the codes below
TRAIN, VALID, TEST = 0, 1, 2


def pair_indices(groups: np.ndarray, conditions: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """Sorted row indices of every (group, condition) pair present in the two label arrays."""
    frame = pd.DataFrame({"group": groups, "condition": conditions})
    return {key: np.asarray(idx) for key, idx in frame.groupby(["group", "condition"], sort=True).indices.items()}


def _pair_rng(seed: int, group: str, condition: str) -> np.random.Generator:
    """The generator of one pair: seeded with (seed, crc32(group, condition)), so a pair's split does
    not depend on which other pairs are present."""
    return np.random.default_rng([seed, zlib.crc32(f"{group}\0{condition}".encode())])


def _count(fraction: float, n: int, pool: int) -> int:
    """round(fraction * n) cells, at least 1 and leaving at least 1 of ``pool`` cells (0 when pool < 2)."""
    return min(max(int(np.floor(fraction * n + 0.5)), 1), pool - 1) if pool >= 2 else 0


def split_cells(
    pairs: dict[tuple[str, str], np.ndarray],
    n_cells: int,
    test_fraction: float,
    valid_fraction: float,
    seed: int,
    holdout: np.ndarray | None = None,
    iid_elsewhere: bool = False,
) -> np.ndarray:
    """int8 [n_cells] split codes (TRAIN / VALID / TEST); cells in no pair are TRAIN.

    i.i.d.: in each (group, condition) of n cells, the pair's generator first draws round(test_fraction * n)
    test cells (at least 1 and at most n - 1 when n >= 2: the same cells as the former train/test split),
    then round(valid_fraction * n) valid cells among the rest (at least 1 and leaving at least 1 train cell
    when 2 or more are left).
    o.o.s. / o.o.d.: with a ``holdout`` mask, exactly the holdout cells are TEST; the valid cells are drawn
    the same way from each pair's m non-holdout cells (round(valid_fraction * m)).
    ``iid_elsewhere`` (held-out contexts of a conditional run): a pair with no holdout cell is split
    i.i.d. as above, so the seen contexts and the control have test cells too.
    ``valid_fraction == 0``: no VALID cells (train/test only, CellOT's protocol).
    """
    codes = np.full(n_cells, TRAIN, dtype=np.int8)
    if holdout is not None:
        codes[holdout] = TEST
    for (group, condition), idx in pairs.items():
        rng = _pair_rng(seed, group, condition)
        iid = holdout is None or (iid_elsewhere and not holdout[idx].any())
        if iid:
            codes[rng.choice(idx, size=_count(test_fraction, len(idx), len(idx)), replace=False)] = TEST
        if valid_fraction > 0:
            rest = idx[codes[idx] != TEST]
            n = len(idx) if iid else len(rest)
            codes[rng.choice(rest, size=_count(valid_fraction, n, len(rest)), replace=False)] = VALID
    return codes
