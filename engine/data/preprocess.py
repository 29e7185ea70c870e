"""Per-cell / per-feature transforms of the data space, fitted once and re-applied to new cells.

- ``none``:            y = x
- ``log1p_normalize``: y_ij = log(1 + 1e4 x_ij / sum_j x_ij)   (library-size normalisation, scRNA-seq)
- ``qscale_log1p``:    y_ij = log(1 + x_ij / q_j), q_j the 75th percentile of feature j over the
                       control train cells (q_j = 1 where it is 0)   (CellOT, Bunne et al. 2023, 4i data)
- ``arcsinh5``:        y = arcsinh(x / 5)   (the standard CyTOF cofactor)

Then, optionally, feature selection: keep the ``hvg`` highly variable features (``highly_variable``),
ranked on the train cells after the transform. New cells get the same transform and the same columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.data.spec import PREPROCESSING, DataError

TARGET_TOTAL = 1e4
QUANTILE = 75.0
DISPERSION_BINS = 20


def highly_variable(x: np.ndarray, n: int) -> np.ndarray:
    """Sorted indices of the n features with the highest normalised dispersion (Seurat v1).

    Satija et al. 2015 (scanpy's default ``flavor="seurat"``), on log1p expression x: with
    e = exp(x) - 1, per feature m = mean(e), dispersion D = log(var(e) / m) (unbiased var), features
    binned into 20 equal-width bins of log1p(m); the score is (D - mean_bin D) / std_bin D (a bin
    with one feature scores 1; a constant feature scores lowest). Ties keep the lower index.
    """
    if n > x.shape[1]:
        raise DataError(f"hvg asks for {n} highly variable features; the data have {x.shape[1]}")
    if np.any(x < 0):
        raise DataError("hvg needs log1p expression (non-negative values); found negative values")
    expressed = np.expm1(x.astype(np.float64))
    mean = expressed.mean(axis=0)
    var = expressed.var(axis=0, ddof=1) if len(x) > 1 else np.zeros_like(mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.log(var / np.maximum(mean, 1e-12))
    dispersion[~np.isfinite(dispersion)] = np.nan
    log_mean = np.log1p(mean)
    edges = np.linspace(log_mean.min(), log_mean.max(), DISPERSION_BINS + 1)
    bins = np.digitize(log_mean, edges[1:-1], right=True)  # (a, b] bins, as pandas.cut
    score = np.full(len(mean), np.nan)
    for b in np.unique(bins):
        members = (bins == b) & np.isfinite(dispersion)
        values = dispersion[members]
        if len(values) == 1:
            score[members] = 1.0
        elif len(values) > 1:
            std = values.std(ddof=1)
            score[members] = (values - values.mean()) / std if std > 0 else 0.0
    order = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")
    return np.sort(order[:n]).astype(np.int64)


@dataclass(eq=False)
class Preprocessing:
    """A fitted transform: ``kind``; for qscale_log1p the per-feature scale q [n_input_features];
    ``keep``, the indices of the input features kept by ``hvg`` selection (None: all)."""

    kind: str
    scale: np.ndarray | None = None
    keep: np.ndarray | None = None

    @classmethod
    def fit(
        cls, kind: str, x: np.ndarray, control_train: np.ndarray, train: np.ndarray, hvg: int | None = None
    ) -> Preprocessing:
        """Fit on the input matrix ``x``: q on the rows ``control_train`` masks, the highly variable
        features (``hvg`` of them, none when None) on the transformed rows ``train`` masks."""
        if kind not in PREPROCESSING:
            raise DataError(f"unknown preprocess {kind!r}; expected one of {', '.join(PREPROCESSING)}")
        scale = None
        if kind == "qscale_log1p":
            q = np.percentile(x[control_train], QUANTILE, axis=0)
            scale = np.where(q > 0, q, 1.0).astype(np.float32)
        transform = cls(kind, scale)
        if hvg is None:
            return transform
        return cls(kind, scale, highly_variable(transform(x[train]), hvg))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Transform float32 [n, d_in] into a new float32 array [n, d] (the input is not modified)."""
        y = self._transform(x)
        return y if self.keep is None else np.ascontiguousarray(y[:, self.keep])

    def _transform(self, x: np.ndarray) -> np.ndarray:
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
        def same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
            return a is b is None or (a is not None and b is not None and np.array_equal(a, b))

        return (isinstance(other, Preprocessing) and self.kind == other.kind
                and same(self.scale, other.scale) and same(self.keep, other.keep))
