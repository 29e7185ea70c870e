"""Contexts: a map's labels as a vector, what a conditional solver (CondOT) conditions on.

A map is a (group, perturbation); its context reads the labels of the run's context keys, each the
condition key (the perturbation) or the split-by key (the group), each with an embedding
(CondOT, Bunne et al. 2022, Sec. 3.2):

- onehot: a one-hot over the key's labels; a combination "A+B" is the multi-hot sum of A's and B's
  (the paper's additive combinator), so a new pair of seen parts has a context;
- value: the label as a number, scaled by the largest |value| of the run (the paper: dose / 10000);
- log: log10 of the label (> 0), scaled the same way (doses whose effect grows with log-dose);
- moa (the condition key only): a mode-of-action point per perturbation, from the W2 distances
  between perturbed populations (engine.data.moa); a combination "A+B" is the sum of A's and B's
  points, so A and B need cells of their own.

The blocks are concatenated in the order of the keys. Without `context_keys` a run's contexts are a
onehot of the perturbation then (when split) of the group. The vocabularies and scales come from the
run's maps (held-out contexts included: labels only, never cells), so a context does not depend on
the stack, and a value never seen (a new dose) still has one. Mode-of-action points come from cells
(`engine.data.prepare` computes them on training cells and saves the encoder with the prepared data,
so prediction reads the same points); a part without a point (a perturbation not in the data) has no
context.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.data.spec import DataError, DataSpec, MapKey, name_some, parse_embeddings

if TYPE_CHECKING:
    from engine.data.prepared import PreparedData


def _number(label: str, key: str, kind: str) -> float:
    try:
        value = float(label)
    except ValueError:
        raise DataError(f"embedding {key}={kind} needs numeric labels; obs[{key!r}] has {label!r}") from None
    if kind == "log":
        if not value > 0:
            raise DataError(f"embedding {key}=log needs labels > 0; obs[{key!r}] has {label!r}")
        return math.log10(value)
    return value


@dataclass(frozen=True, eq=False)
class ContextEncoder:
    """Labels -> context vectors for the keys of a run (see the module docstring)."""

    keys: tuple[str, ...]
    kinds: tuple[str, ...]
    vocabularies: tuple[tuple[str, ...], ...]  # onehot, moa: the sorted parts; value/log: ()
    scales: tuple[float, ...]  # value/log: the largest |number| of the run (1 when 0); onehot, moa: 1
    points: tuple[np.ndarray | None, ...]  # moa: [parts, m] a point per part of the vocabulary; else None

    @classmethod
    def for_maps(cls, spec: DataSpec, maps: list[MapKey], moa: Mapping[str, np.ndarray] | None = None) -> "ContextEncoder":
        """The encoder of a run's maps; `moa`: a mode-of-action point per perturbation (engine.data.moa),
        needed when an embedding is moa (None there checks the labels only, each part a unit vector)."""
        keys = spec.context_keys or (spec.condition_key, *((spec.split_by,) if spec.split_by else ()))
        kinds = parse_embeddings(spec.embeddings, keys)
        vocabularies, scales, points = [], [], []
        for key in keys:
            labels = sorted({_label(spec, m, key) for m in maps})
            if kinds[key] in ("onehot", "moa"):
                vocabulary = tuple(sorted({p for label in labels for p in label.split("+")}))
                vocabularies.append(vocabulary)
                scales.append(1.0)
                points.append(None if kinds[key] == "onehot" else _moa_points(key, vocabulary, moa))
            else:
                largest = max(abs(_number(label, key, kinds[key])) for label in labels)
                vocabularies.append(())
                scales.append(largest if largest > 0 else 1.0)
                points.append(None)
        encoder = cls(tuple(keys), tuple(kinds[k] for k in keys), tuple(vocabularies), tuple(scales), tuple(points))
        contexts = encoder.encode_maps(spec, maps)
        if spec.context_keys and len(np.unique(contexts, axis=0)) < len(maps):
            raise DataError(f"two maps have the same context under context keys {name_some(list(keys))}; "
                            "add the key that tells them apart")
        return encoder

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the prepared data's meta.json)."""
        return {"keys": list(self.keys), "kinds": list(self.kinds), "vocabularies": [list(v) for v in self.vocabularies],
                "scales": list(self.scales), "points": [None if p is None else p.tolist() for p in self.points]}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ContextEncoder":
        return cls(tuple(raw["keys"]), tuple(raw["kinds"]), tuple(tuple(v) for v in raw["vocabularies"]),
                   tuple(raw["scales"]), tuple(None if p is None else np.asarray(p, np.float32) for p in raw["points"]))

    @property
    def dim(self) -> int:
        return sum(self._width(i) for i in range(len(self.keys)))

    def _width(self, i: int) -> int:
        if self.points[i] is not None:
            return self.points[i].shape[1]
        return len(self.vocabularies[i]) if self.kinds[i] == "onehot" else 1

    def encode(self, labels: dict[str, str]) -> np.ndarray:
        """One context [c] from a label per key; DataError for a missing key or an unknown part."""
        blocks = []
        for i, (key, kind, vocabulary, scale) in enumerate(zip(self.keys, self.kinds, self.vocabularies, self.scales)):
            if key not in labels:
                raise DataError(f"a context needs a value for {key!r} (context keys: {name_some(list(self.keys))})")
            label = str(labels[key])
            if kind in ("value", "log"):
                blocks.append(np.array([_number(label, key, kind) / scale]))
                continue
            parts = np.zeros(len(vocabulary))
            for part in label.split("+"):
                if part not in vocabulary:
                    raise DataError(f"{key}={part!r} is not a label of this run; known: {name_some(list(vocabulary))}")
                parts[vocabulary.index(part)] += 1.0
            blocks.append(parts if self.points[i] is None else parts @ self.points[i])
        return np.concatenate(blocks).astype(np.float32)

    def encode_maps(self, spec: DataSpec, keys: list[MapKey]) -> np.ndarray:
        """Contexts of maps [K, c]."""
        return np.stack([self.encode({key: _label(spec, m, key) for key in self.keys}) for m in keys])


def _moa_points(key: str, vocabulary: tuple[str, ...], moa: Mapping[str, np.ndarray] | None) -> np.ndarray:
    """[parts, m] mode-of-action points of a key's parts (unit vectors for a labels-only check)."""
    if moa is None:
        return np.eye(len(vocabulary), dtype=np.float32)
    missing = [part for part in vocabulary if part not in moa]
    if missing:
        raise DataError(f"embedding {key}=moa needs cells of each part on its own; no population for "
                        f"{name_some(missing)} (only in combinations)")
    return np.stack([moa[part] for part in vocabulary]).astype(np.float32)


def _label(spec: DataSpec, key: MapKey, obs_key: str) -> str:
    """A map's label for a context key: its perturbation (condition key) or its group (split-by key)."""
    return key.perturbation if obs_key == spec.condition_key else str(key.group)


def map_contexts(prepared: PreparedData, keys: list[MapKey]) -> np.ndarray:
    """Contexts [K, c] of the maps `keys`, by the run's encoder (its vocabularies, scales and points)."""
    return prepared.contexts.encode_maps(prepared.spec, keys)


def context_map(spec: DataSpec, maps: list[MapKey], labels: dict[str, str]) -> MapKey:
    """The map a context names, e.g. {"dose": "3000"} -> MapKey(None, "3000") (`predict --context`):
    a label for every context key and no other key; the perturbation (or group) of a run with a
    single one need not be given when it is not a context key."""
    keys = spec.context_keys or ()
    unknown = sorted(set(labels) - set(keys))
    missing = [k for k in keys if k not in labels]
    if not keys or unknown or missing:
        raise DataError(f"--context needs KEY=VALUE for each context key of the run ({name_some(list(keys))}); "
                        f"got {name_some(sorted(labels))}")

    def label(obs_key: str, of_map: list[str]) -> str:
        if obs_key in labels:
            return labels[obs_key]
        if len(set(of_map)) != 1:
            raise DataError(f"--context needs a value for {obs_key!r} (the run has several)")
        return of_map[0]

    group = label(spec.split_by, [str(m.group) for m in maps]) if spec.split_by else None
    return MapKey(group, label(spec.condition_key, [m.perturbation for m in maps]))
