"""AnnData -> PreparedData: validated, preprocessed, split and embedded cells in Arrow tables.

One table per (group, condition, split), for every split in ``spec.splits`` (train, valid, test; or
train, test when ``spec.select_on == "test"``): ``cell`` (obs name), ``x`` (fixed_size_list<float32>[dim],
training space) and, when embedded, ``x_data`` (fixed_size_list<float32>[n_features], data space
after preprocessing). Tables are read back as numpy views without a copy.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from typing import Iterable

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc

from engine.data.contexts import ContextEncoder
from engine.data.moa import mode_of_action
from engine.data.embed import Embedding, PCAEmbedding, fit_embedding, load_embedding
from engine.data.io import aligned_features, feature_matrix
from engine.data.markers import rank_markers
from engine.data.preprocess import Preprocessing
from engine.data.spec import DataError, DataSpec, MapKey, name_some, parse_embeddings
from engine.data.split import SPLITS, TRAIN, pair_indices, split_cells
from engine.storage import PathLike, StoragePath, as_storage, to_bytes

FORMAT = 3  # 3: rows per table in meta.json; 2: valid split and DataSpec.select_on; 1: train/test tables only
TableKey = tuple[str, str, str]  # (group or "", condition, split)


def _fixed_size_lists(x: np.ndarray) -> pa.FixedSizeListArray:
    """[n, d] float32 -> fixed_size_list<float32>[d] over the same contiguous buffer."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), x.shape[1])


def _read_arrow(path: StoragePath) -> pa.Table:
    """An Arrow IPC file as a table: over a memory map (no copy) on a local disk, else read whole."""
    if path.local is not None:
        return ipc.open_file(pa.memory_map(path.path)).read_all()
    with path.fs.open_input_file(path.path) as source:
        return ipc.open_file(source).read_all()


def read_tables(directory: PathLike, keys: Iterable[TableKey]) -> dict[TableKey, pa.Table]:
    """Some cell tables of a saved PreparedData (``save``), e.g. those of one worker's maps."""
    directory = as_storage(directory)
    return _read_tables(directory, _table_entries(json.loads((directory / "meta.json").read_text())), keys)


def _read_tables(
    directory: StoragePath, entries: dict[TableKey, dict], keys: Iterable[TableKey]
) -> dict[TableKey, pa.Table]:
    keys = list(keys)
    unknown = [key for key in keys if key not in entries]
    if unknown:
        raise KeyError(f"no cell table {unknown[0]} in {directory}")
    return {key: _read_arrow(directory / entries[key]["file"]) for key in keys}


def _table_entries(meta: dict) -> dict[TableKey, dict]:
    return {(e["group"], e["condition"], e["split"]): e for e in meta["tables"]}


def _matrix(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_list<float32> column as a read-only [n, d] view (zero-copy for one chunk)."""
    array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return array.flatten().to_numpy(zero_copy_only=True).reshape(-1, column.type.list_size)


@dataclass(eq=False)
class PreparedData:
    """The cells of every map, split, in the training space (and the data space when embedded)."""

    spec: DataSpec
    features: list[str]  # data space (after hvg selection)
    input_features: list[str]  # what new cells must have (all features read, before selection)
    maps: list[MapKey]
    tables: dict[TableKey, pa.Table]  # the cell tables held in memory: all, some (a worker's), or none (``layout``)
    preprocessing: Preprocessing
    embedding: Embedding | None
    markers: dict[str, np.ndarray]
    contexts: ContextEncoder  # the maps' contexts (mode-of-action points fitted on train cells)
    table_rows: dict[TableKey, int]  # cells per table, of every table (held or not)

    @property
    def dim(self) -> int:
        """Dimension of the training space: the latent one when embedded, else n_features."""
        return len(self.features) if self.embedding is None else self.embedding.dim

    def _table(self, group: str | None, condition: str, split: str) -> pa.Table:
        key = (group or "", condition, split)
        if key not in self.tables:
            held = "not held here" if key in self.table_rows else "none"
            raise KeyError(f"no cell table for group={group!r}, condition={condition!r}, split={split!r} ({held})")
        return self.tables[key]

    def layout(self) -> PreparedData:
        """Everything but the cells (what a driver keeps once the data is saved)."""
        return replace(self, tables={})

    def cells(self, group: str | None, condition: str, split: str, space: str = "train") -> np.ndarray:
        """Read-only float32 [n, d] view of a table: ``space`` "train" (dim) or "data" (n_features)."""
        if space not in ("train", "data"):
            raise ValueError(f"space must be 'train' or 'data', got {space!r}")
        column = "x_data" if space == "data" and self.embedding is not None else "x"
        return _matrix(self._table(group, condition, split).column(column))

    def cell_names(self, group: str | None, condition: str, split: str) -> list[str]:
        """Obs names of a table's cells, in table order."""
        return self._table(group, condition, split).column("cell").to_pylist()

    def has_training_cells(self, key: MapKey) -> bool:
        """False for a held-out context (its perturbed cells are all test cells)."""
        return self.table_rows[(key.group or "", key.perturbation, "train")] > 0

    def control_of(self, key: MapKey) -> tuple[str | None, str]:
        """(group, control label) of the source cells of a map."""
        return key.group, self.spec.control

    def n_cells(self, key: MapKey) -> int:
        """Train cells of a map, source plus target (the load-balancing weight)."""
        return sum(self.table_rows[(key.group or "", c, "train")] for c in (self.spec.control, key.perturbation))

    def encode_controls(self, adata: ad.AnnData) -> np.ndarray:
        """New cells in the training space: the fitted preprocessing, then the embedding.

        Features must match ``self.input_features`` by name (a permutation is reordered), else DataError.
        """
        x = self.preprocessing(aligned_features(adata, self.input_features, self.spec.obsm_key))
        return x if self.embedding is None else self.embedding.encode(x)

    def save(self, directory: PathLike) -> StoragePath:
        """Write tables as Arrow IPC files, ``meta.json`` and ``arrays.npz`` (any storage location,
        engine.storage); returns the directory."""
        directory = as_storage(directory)
        directory.mkdir()
        entries = []
        for i, ((group, condition, split), table) in enumerate(sorted(self.tables.items())):
            file = f"cells_{i:05d}.arrow"
            with (directory / file).open_output() as sink, ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            entries.append({"group": group, "condition": condition, "split": split, "file": file,
                            "rows": table.num_rows})
        arrays = {"markers": np.stack([self.markers[key.name] for key in self.maps])}
        if self.preprocessing.scale is not None:
            arrays["qscale"] = self.preprocessing.scale
        if self.preprocessing.keep is not None:
            arrays["hvg"] = self.preprocessing.keep
        (directory / "arrays.npz").write_bytes(to_bytes(lambda f: np.savez(f, **arrays)))
        if self.embedding is not None:
            self.embedding.save(directory)
        meta = {
            "format": FORMAT,
            "spec": self.spec.to_dict(),
            "features": self.features,
            "input_features": self.input_features,
            "maps": [[key.group, key.perturbation] for key in self.maps],
            "tables": entries,
            "contexts": self.contexts.to_dict(),
        }
        (directory / "meta.json").write_text(json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: PathLike, tables: Iterable[TableKey] | None = None) -> PreparedData:
        """Read what ``save`` wrote; on a local disk the tables are memory-mapped, not copied.
        ``tables``: which cell tables to hold (default all; ``()`` for the layout alone)."""
        directory = as_storage(directory)
        if not (directory / "meta.json").is_file():
            raise DataError(f"no prepared data in {directory} (meta.json missing)")
        meta = json.loads((directory / "meta.json").read_text())
        if meta.get("format", 1) == 1:  # made before the valid split: train/test only, selected on test
            meta["spec"] = {**meta["spec"], "select_on": "test"}
        spec = DataSpec.from_dict(meta["spec"])
        maps = [MapKey(group, perturbation) for group, perturbation in meta["maps"]]
        entries = _table_entries(meta)
        held = _read_tables(directory, entries, entries if tables is None else tables)
        rows = {key: e["rows"] if "rows" in e else _read_arrow(directory / e["file"]).num_rows
                for key, e in entries.items()}  # before format 3: counted from the tables
        with np.load(io.BytesIO((directory / "arrays.npz").read_bytes())) as arrays:
            markers = {key.name: arrays["markers"][i] for i, key in enumerate(maps)}
            preprocessing = Preprocessing(spec.preprocess, arrays.get("qscale"), arrays.get("hvg"))
            embedding = load_embedding(directory) or (  # before pca.npz, PCA was in arrays.npz
                PCAEmbedding(arrays["pca_mean"], arrays["pca_components"]) if "pca_mean" in arrays else None)
        input_features = meta.get("input_features", meta["features"])
        contexts = (ContextEncoder.from_dict(meta["contexts"]) if "contexts" in meta  # saved before: from labels
                    else ContextEncoder.for_maps(spec, maps))
        return cls(spec, meta["features"], input_features, maps, held, preprocessing, embedding, markers, contexts, rows)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PreparedData)
            and (self.spec, self.features, self.input_features, self.maps)
            == (other.spec, other.features, other.input_features, other.maps)
            and self.preprocessing == other.preprocessing
            and self.embedding == other.embedding
            and json.dumps(self.contexts.to_dict()) == json.dumps(other.contexts.to_dict())
            and self.markers.keys() == other.markers.keys()
            and all(np.array_equal(v, other.markers[k]) for k, v in self.markers.items())
            and self.table_rows == other.table_rows
            and self.tables.keys() == other.tables.keys()
            and all(t.equals(other.tables[k]) for k, t in self.tables.items())
        )


def _labels(adata: ad.AnnData, key: str, role: str) -> np.ndarray:
    """obs[key] as an object array of str; DataError naming the key when it is not an obs column."""
    if key not in adata.obs.columns:
        columns = name_some([str(c) for c in adata.obs.columns])
        raise DataError(f"{role} {key!r} is not an obs column; obs columns: {columns}")
    return adata.obs[key].astype(str).to_numpy(dtype=object)


def _perturbations(conditions: np.ndarray, spec: DataSpec) -> set[str]:
    """The perturbation labels to map, checked against those present in obs[condition_key]."""
    present = set(pd.unique(conditions))
    where = f"obs[{spec.condition_key!r}]"
    if spec.control not in present:
        raise DataError(f"control label {spec.control!r} not found in {where}; labels: {name_some(sorted(present))}")
    if spec.perturbations is None:
        if present == {spec.control}:
            raise DataError(f"{where} has no perturbation labels besides the control {spec.control!r}")
        return present - {spec.control}
    if spec.control in spec.perturbations:
        raise DataError(f"the control label {spec.control!r} is also listed as a perturbation")
    unknown = [p for p in spec.perturbations if p not in present]
    if unknown:
        raise DataError(f"perturbation labels not found in {where}: {name_some(unknown)}")
    return set(spec.perturbations)


def _groups(groups: np.ndarray, spec: DataSpec) -> set[str]:
    """The groups whose maps are made (spec.groups, checked against obs[split_by]; else every group)."""
    present = set(pd.unique(groups))
    if spec.groups is None:
        return present
    unknown = [g for g in spec.groups if g not in present]
    if unknown:
        raise DataError(f"group labels not found in obs[{spec.split_by!r}]: {name_some(unknown)}; "
                        f"labels: {name_some(sorted(present))}")
    return set(spec.groups)


def _where(spec: DataSpec, group: str, condition: str) -> str:
    """'condition_key='label'[, split_by='group']' for messages."""
    return f"{spec.condition_key}={condition!r}" + (f", {spec.split_by}={group!r}" if spec.split_by else "")


def _check_counts(used: list[tuple[str, str]], pairs: dict[tuple[str, str], np.ndarray], spec: DataSpec) -> None:
    small = [(g, c, len(pairs.get((g, c), ()))) for g, c in used if len(pairs.get((g, c), ())) < spec.min_cells]
    if small:
        g, c, n = small[0]
        more = f" (and {len(small) - 1} more groups/conditions)" if len(small) > 1 else ""
        raise DataError(f"too few cells: {_where(spec, g, c)} has {n} cells (min_cells={spec.min_cells}){more}")


def _check_splits(
    used: list[tuple[str, str]], pairs: dict[tuple[str, str], np.ndarray], codes: np.ndarray, spec: DataSpec,
    unseen: set[tuple[str, str]] = frozenset(),
) -> None:
    """Every split of ``spec.splits`` has cells in every used (group, condition), else a DataError;
    the ``unseen`` pairs (held-out contexts) need test cells only."""
    for g, c in used:
        counts = np.bincount(codes[pairs[(g, c)]], minlength=len(SPLITS))
        n = {split: int(counts[SPLITS.index(split)]) for split in spec.splits}
        if (g, c) in unseen:
            n = {"test": n["test"]}
        if min(n.values()) == 0:
            parts = [f"{count} {split}" for split, count in n.items()]
            raise DataError(
                f"empty split: {_where(spec, g, c)} has {', '.join(parts[:-1])} and {parts[-1]} cells"
                + (f" with holdout {spec.holdout_text}" if spec.holdout else "")
            )


def _unseen_pairs(
    maps: list[MapKey], pairs: dict[tuple[str, str], np.ndarray], codes: np.ndarray, spec: DataSpec
) -> set[tuple[str, str]]:
    """The (group, condition) pairs of held-out contexts: with context keys, a map whose perturbed
    cells are all held out is an unseen context (evaluated, not trained), and so is the control of a
    group whose maps are all unseen. Without context keys: none (every map must train)."""
    if spec.context_keys is None:
        return set()
    unseen = {(m.group or "", m.perturbation) for m in maps if not (codes[pairs[(m.group or "", m.perturbation)]] == TRAIN).any()}
    if len(unseen) == len(maps):
        raise DataError("every context is held out: nothing to train on")
    seen_groups = {m.group or "" for m in maps if (m.group or "", m.perturbation) not in unseen}
    return unseen | {(g, spec.control) for g, _ in unseen if g not in seen_groups}


def _cell_table(names: np.ndarray, x_model: np.ndarray, x_data: np.ndarray | None) -> pa.Table:
    """Columns cell, x and (when embedded) x_data."""
    columns = {"cell": pa.array(names, pa.string()), "x": _fixed_size_lists(x_model)}
    if x_data is not None:
        columns["x_data"] = _fixed_size_lists(x_data)
    return pa.table(columns)


def prepare(adata: ad.AnnData, spec: DataSpec) -> PreparedData:
    """Validate, select, split, preprocess, embed and rank markers (DESIGN.md "Data flow", step 1).

    Maps: every (group, perturbation) present, with the control cells of the same group (one group
    when ``spec.split_by`` is None; only the groups ``spec.groups`` when given). Only the cells of the maps' (group, condition) pairs are kept.
    Cells are split per (group, condition) into ``spec.splits`` (engine.data.split). The preprocessing
    is fitted on control train cells; the highly variable features (``spec.hvg``) and the embedding
    (``spec.embed``) on all train cells (the autoencoder keeps its best state on valid cells); the
    markers on the train cells of each map (data space). Test cells never influence any of them.
    Every bad input is a one-line DataError.
    """
    if not adata.obs_names.is_unique:
        repeated = adata.obs_names[adata.obs_names.duplicated()].unique()
        raise DataError(f"duplicate cell names in obs_names: {name_some(list(map(str, repeated)))}")
    conditions = _labels(adata, spec.condition_key, "condition key")
    groups = _labels(adata, spec.split_by, "split_by key") if spec.split_by else np.full(adata.n_obs, "", dtype=object)
    holdout = None
    if spec.holdout is not None:
        key, values = spec.holdout
        labels = _labels(adata, key, "holdout key")
        missing = [v for v in values if not (labels == v).any()]
        if missing:
            raise DataError(f"holdout value(s) {name_some(missing)} not found in obs[{key!r}]; "
                            f"labels: {name_some(sorted(set(labels)))}")
        holdout = np.isin(labels, values)
    perturbations = _perturbations(conditions, spec)
    wanted_groups = _groups(groups, spec)
    all_pairs = pair_indices(groups, conditions)
    maps = sorted(
        (MapKey(g if spec.split_by else None, c) for g, c in all_pairs if c in perturbations and g in wanted_groups),
        key=lambda m: (m.group or "", m.perturbation),
    )
    if not maps:
        raise DataError(f"no map to make: none of the perturbations is in the groups {name_some(sorted(wanted_groups))}")
    if spec.context_keys is not None:
        ContextEncoder.for_maps(spec, maps)  # bad labels for an embedding fail here, before any work (moa: labels only)
    if spec.growth is not None:
        named = {k.name for k in maps} | {k.perturbation for k in maps}
        unknown = [label for label in spec.growth if label not in named]
        if unknown:
            raise DataError(f"growth factors name {name_some(unknown)}: neither a perturbation nor a map of this run")
    used = sorted({(key.group or "", c) for key in maps for c in (spec.control, key.perturbation)})
    _check_counts(used, all_pairs, spec)

    rows = np.sort(np.concatenate([all_pairs[p] for p in used]))
    x, input_features = feature_matrix(adata, spec.obsm_key, rows)
    names = adata.obs_names.to_numpy(dtype=object)[rows]
    conditions, groups = conditions[rows], groups[rows]
    pairs = pair_indices(groups, conditions)
    held_out = None if holdout is None else holdout[rows]
    valid_fraction = spec.valid_fraction if "valid" in spec.splits else 0.0
    codes = split_cells(pairs, len(rows), spec.test_fraction, valid_fraction, spec.seed, held_out,
                        iid_elsewhere=spec.context_keys is not None)
    unseen = _unseen_pairs(maps, pairs, codes, spec)
    _check_splits(used, pairs, codes, spec, unseen)
    train = codes == TRAIN

    preprocessing = Preprocessing.fit(spec.preprocess, x, train & (conditions == spec.control), train, spec.hvg)
    x_data = preprocessing(x)
    del x
    keep = preprocessing.keep
    features = input_features if keep is None else [input_features[i] for i in keep]
    selects = codes == SPLITS.index("valid") if "valid" in spec.splits else train  # never the test cells
    embedding = fit_embedding(spec.embed, x_data[train], x_data[selects], spec.seed)
    x_model = x_data if embedding is None else embedding.encode(x_data)

    rows_of = {
        (g, c, split): pairs[(g, c)][codes[pairs[(g, c)]] == SPLITS.index(split)]
        for g, c in used
        for split in spec.splits
    }

    def train_rows(key: MapKey, condition: str | None) -> np.ndarray:
        """Train rows of a map's target (condition None) or control; for an unseen context, those of every map pooled."""
        of = maps if (key.group or "", key.perturbation) in unseen else [key]
        return np.unique(np.concatenate([rows_of[(m.group or "", condition or m.perturbation, "train")] for m in of]))

    markers = {}
    for key in maps:
        target_rows, control_rows = train_rows(key, None), train_rows(key, spec.control)
        markers[key.name] = rank_markers(x_data[target_rows], x_data[control_rows], spec.markers)
    tables = {
        key: _cell_table(names[idx], x_model[idx], None if embedding is None else x_data[idx])
        for key, idx in rows_of.items()
    }
    moa_key = spec.context_keys and parse_embeddings(spec.embeddings, spec.context_keys).get(spec.condition_key) == "moa"
    moa = _mode_of_action(spec, maps, x_model, rows_of, unseen) if moa_key else None
    contexts = ContextEncoder.for_maps(spec, maps, moa)
    rows = {key: table.num_rows for key, table in tables.items()}
    return PreparedData(spec, features, input_features, maps, tables, preprocessing, embedding, markers, contexts, rows)


def _mode_of_action(
    spec: DataSpec, maps: list[MapKey], x_model: np.ndarray, rows_of: dict[tuple[str, str, str], np.ndarray],
    unseen: set[tuple[str, str]],
) -> dict[str, np.ndarray]:
    """Mode-of-action points of the single perturbations (engine.data.moa): the MDS of their train
    cells (pooled over groups); a perturbation held out everywhere is placed from its held-out cells."""
    seen: dict[str, list[np.ndarray]] = {}
    held_out: dict[str, list[np.ndarray]] = {}
    for key in maps:
        if "+" in key.perturbation:
            continue
        pair = (key.group or "", key.perturbation)
        if pair in unseen:
            held_out.setdefault(key.perturbation, []).append(rows_of[(*pair, "test")])
        else:
            seen.setdefault(key.perturbation, []).append(rows_of[(*pair, "train")])
    if len(seen) < 2:
        raise DataError(f"embedding {spec.condition_key}=moa needs two perturbations with training cells "
                        f"(single ones, not combinations); got {name_some(sorted(seen))}")
    cells = {label: x_model[np.concatenate(rows)] for label, rows in seen.items()}
    held = {label: x_model[np.concatenate(rows)] for label, rows in held_out.items() if label not in seen}
    return mode_of_action(cells, held)
