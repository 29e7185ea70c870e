"""Contexts: a map's labels as a vector, what a conditional solver (CondOT) conditions on.

A map is a (group, perturbation); its context reads the labels of the run's context keys, each the
condition key (the perturbation) or the split-by key (the group), each with an embedding
(CondOT, Bunne et al. 2022, Sec. 3.2):

- onehot: a one-hot over the key's labels; a combination "A+B" is the multi-hot sum of A's and B's
  (the paper's additive combinator), so a new pair of seen parts has a context;
- value: the label as a number, scaled by the largest |value| of the run (the paper: dose / 10000);
- log: log10 of the label (> 0), scaled the same way (doses whose effect grows with log-dose).

The blocks are concatenated in the order of the keys. Without `context_keys` a run's contexts are a
onehot of the perturbation then (when split) of the group. The vocabularies and scales come from the
run's maps (held-out contexts included: labels only, never cells), so a context does not depend on
the stack, and a value never seen (a new dose) still has one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.data.spec import DataError, DataSpec, MapKey, name_some, parse_embeddings

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


@dataclass(frozen=True)
class ContextEncoder:
    """Labels -> context vectors for the keys of a run (see the module docstring)."""

    keys: tuple[str, ...]
    kinds: tuple[str, ...]
    vocabularies: tuple[tuple[str, ...], ...]  # onehot: the sorted parts; value/log: ()
    scales: tuple[float, ...]  # value/log: the largest |number| of the run (1 when 0); onehot: 1

    @classmethod
    def for_maps(cls, spec: DataSpec, maps: list[MapKey]) -> "ContextEncoder":
        keys = spec.context_keys or (spec.condition_key, *((spec.split_by,) if spec.split_by else ()))
        kinds = parse_embeddings(spec.embeddings, keys)
        vocabularies, scales = [], []
        for key in keys:
            labels = sorted({_label(spec, m, key) for m in maps})
            if kinds[key] == "onehot":
                vocabularies.append(tuple(sorted({p for label in labels for p in label.split("+")})))
                scales.append(1.0)
            else:
                largest = max(abs(_number(label, key, kinds[key])) for label in labels)
                vocabularies.append(())
                scales.append(largest if largest > 0 else 1.0)
        encoder = cls(tuple(keys), tuple(kinds[k] for k in keys), tuple(vocabularies), tuple(scales))
        contexts = encoder.encode_maps(spec, maps)
        if spec.context_keys and len(np.unique(contexts, axis=0)) < len(maps):
            raise DataError(f"two maps have the same context under context keys {name_some(list(keys))}; "
                            "add the key that tells them apart")
        return encoder

    @property
    def dim(self) -> int:
        return sum(len(v) if kind == "onehot" else 1 for kind, v in zip(self.kinds, self.vocabularies))

    def encode(self, labels: dict[str, str]) -> np.ndarray:
        """One context [c] from a label per key; DataError for a missing key or an unknown part."""
        blocks = []
        for key, kind, vocabulary, scale in zip(self.keys, self.kinds, self.vocabularies, self.scales):
            if key not in labels:
                raise DataError(f"a context needs a value for {key!r} (context keys: {name_some(list(self.keys))})")
            label = str(labels[key])
            if kind != "onehot":
                blocks.append(np.array([_number(label, key, kind) / scale]))
                continue
            block = np.zeros(len(vocabulary))
            for part in label.split("+"):
                if part not in vocabulary:
                    raise DataError(f"{key}={part!r} is not a label of this run; known: {name_some(list(vocabulary))}")
                block[vocabulary.index(part)] += 1.0
            blocks.append(block)
        return np.concatenate(blocks).astype(np.float32)

    def encode_maps(self, spec: DataSpec, keys: list[MapKey]) -> np.ndarray:
        """Contexts of maps [K, c]."""
        return np.stack([self.encode({key: _label(spec, m, key) for key in self.keys}) for m in keys])


def _label(spec: DataSpec, key: MapKey, obs_key: str) -> str:
    """A map's label for a context key: its perturbation (condition key) or its group (split-by key)."""
    return key.perturbation if obs_key == spec.condition_key else str(key.group)


def map_contexts(spec: DataSpec, all_maps: list[MapKey], keys: list[MapKey]) -> np.ndarray:
    """Contexts [K, c] of the maps `keys`, with the vocabularies and scales of the run's maps `all_maps`."""
    return ContextEncoder.for_maps(spec, all_maps).encode_maps(spec, keys)


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
