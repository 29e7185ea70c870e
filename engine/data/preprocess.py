"""Per-cell / per-feature transforms of the data space, fitted once and re-applied to new cells.

- ``none``:            y = x
- ``log1p_normalize``: y_ij = log(1 + 1e4 x_ij / sum_j x_ij)   (library-size normalisation, scRNA-seq)
- ``qscale_log1p``:    y_ij = log(1 + x_ij / q_j), q_j the 75th percentile of feature j over the
                       control train cells (q_j = 1 where it is 0)   (CellOT, Bunne et al. 2023, 4i data)
- ``arcsinh5``:        y = arcsinh(x / 5)   (the standard CyTOF cofactor)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.data.spec import PREPROCESSING, DataError

TARGET_TOTAL = 1e4
QUANTILE = 75.0


@dataclass(eq=False)
class Preprocessing:
    """A fitted transform: ``kind`` and, for qscale_log1p, the per-feature scale q [n_features]."""

    kind: str
    scale: np.ndarray | None = None

    @classmethod
    def fit(cls, kind: str, x: np.ndarray, control_train: np.ndarray) -> Preprocessing:
        """Fit on the data-space matrix ``x``; ``control_train`` masks the rows that define q."""
        if kind not in PREPROCESSING:
            raise DataError(f"unknown preprocess {kind!r}; expected one of {', '.join(PREPROCESSING)}")
        if kind != "qscale_log1p":
            return cls(kind)
        q = np.percentile(x[control_train], QUANTILE, axis=0)
        return cls(kind, np.where(q > 0, q, 1.0).astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Transform float32 [n, d] into a new float32 array (the input is not modified)."""
        if self.kind in ("log1p_normalize", "qscale_log1p"):
            n_negative = int(np.count_nonzero(x < 0))
            if n_negative:
                raise DataError(
                    f"preprocess {self.kind!r} needs non-negative values; found {n_negative} negative "
                    f"(min {float(x.min()):.4g})"
                )
        if self.kind == "log1p_normalize":
            total = x.sum(axis=1, keepdims=True, dtype=np.float64)
            factor = np.divide(TARGET_TOTAL, total, out=np.zeros_like(total), where=total > 0)
            return np.log1p(x * factor.astype(np.float32))
        if self.kind == "qscale_log1p":
            return np.log1p(x / self.scale)
        if self.kind == "arcsinh5":
            return np.arcsinh(x / np.float32(5.0))
        return x.copy()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Preprocessing) or self.kind != other.kind:
            return False
        if self.scale is None or other.scale is None:
            return self.scale is None and other.scale is None
        return bool(np.array_equal(self.scale, other.scale))
