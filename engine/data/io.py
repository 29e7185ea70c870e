"""Reading AnnData files and their feature matrices (dense X, sparse X or an obsm entry)."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from engine.data.spec import DataError, name_some


def read_h5ad(path: str | Path) -> ad.AnnData:
    """Read an h5ad file into memory; DataError when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with warnings.catch_warnings():  # old-format / duplicate-name notices: prepare() validates itself
            warnings.simplefilter("ignore")
            return ad.read_h5ad(path)
    except Exception as err:  # h5py, anndata and OS errors all mean "unreadable" here
        raise DataError(f"cannot read {path} as h5ad: {type(err).__name__}: {err}") from err


def feature_matrix(
    adata: ad.AnnData, obsm_key: str | None = None, rows: np.ndarray | None = None
) -> tuple[np.ndarray, list[str]]:
    """Dense C-contiguous float32 [n_cells, n_features] and feature names, of X or ``obsm[obsm_key]``.

    ``rows`` (integer indices) selects cells before densifying. DataError for a missing obsm key,
    duplicate feature names, non-numeric or non-finite values.
    """
    if obsm_key is None:
        raw, names, where = adata.X, [str(v) for v in adata.var_names], "X"
        if raw is None:
            raise DataError("the AnnData has no X matrix; give obsm_key to read features from obsm")
    else:
        if obsm_key not in adata.obsm:
            raise DataError(f"obsm key {obsm_key!r} not found; available: {name_some(sorted(adata.obsm))}")
        raw, where = adata.obsm[obsm_key], f"obsm[{obsm_key!r}]"
        if isinstance(raw, pd.DataFrame):
            names, raw = [str(c) for c in raw.columns], raw.to_numpy()
        else:
            names = [f"{obsm_key}_{i}" for i in range(raw.shape[1])]
    index = pd.Index(names)
    duplicated = sorted(set(index[index.duplicated()]))
    if duplicated:
        raise DataError(f"duplicate feature names in {where}: {name_some(duplicated)}")
    if rows is not None:
        raw = raw[rows]
    try:
        x = raw.toarray() if sparse.issparse(raw) else np.asarray(raw)
        x = np.ascontiguousarray(x, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise DataError(f"{where} is not numeric: {err}") from err
    n_bad = x.size - int(np.count_nonzero(np.isfinite(x)))
    if n_bad:
        raise DataError(f"{where} has {n_bad} non-finite values (NaN or inf, or beyond float32 range)")
    return x, names


def aligned_features(adata: ad.AnnData, features: list[str], obsm_key: str | None = None) -> np.ndarray:
    """The feature matrix of ``adata`` with columns in the order of ``features``.

    A permutation of the names is reordered; any other difference is a DataError naming features.
    """
    x, names = feature_matrix(adata, obsm_key)
    if names == features:
        return x
    have, want = set(names), set(features)
    missing = [f for f in features if f not in have]
    extra = [n for n in names if n not in want]
    if missing or extra:
        raise DataError(
            f"features do not match the training data: {len(missing)} missing ({name_some(missing)}), "
            f"{len(extra)} unexpected ({name_some(extra)})"
        )
    return np.ascontiguousarray(x[:, pd.Index(names).get_indexer(features)])
