"""Names shared by the data layer: the error type, a map key, and the data spec."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from engine.options import DataError, parse_options

PREPROCESSING = ("none", "log1p_normalize", "qscale_log1p", "arcsinh5")
SELECT_ON = ("valid", "test")




def name_some(items: list[str], limit: int = 5) -> str:
    """The first ``limit`` items quoted, for one-line messages: "'a', 'b' and 3 more"."""
    if not items:
        return "none"
    shown = ", ".join(map(repr, items[:limit]))
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


EMBEDDINGS = ("onehot", "value", "log", "moa")  # context embeddings (engine.data.contexts)


def parse_embeddings(items: tuple[str, ...], keys: tuple[str, ...]) -> dict[str, str]:
    """{"dose": "log"} from ("dose=log",), checked against the context keys; unlisted keys: onehot."""
    kinds = dict.fromkeys(keys, "onehot")
    for item in items:
        key, sep, kind = str(item).partition("=")
        if not sep or kind not in EMBEDDINGS:
            raise DataError(f"bad embedding {item!r}; expected KEY=KIND with KIND one of {', '.join(EMBEDDINGS)}")
        if key not in kinds:
            raise DataError(f"embedding {item!r} names {key!r}, which is not a context key ({name_some(list(keys))})")
        kinds[key] = kind
    return kinds


class MapKey(NamedTuple):
    """One trained map: a perturbation, within a group when the data are split by a key."""

    group: str | None
    perturbation: str

    @property
    def name(self) -> str:
        """"group/perturbation" when grouped, else "perturbation" (the store's perturbation column)."""
        return self.perturbation if self.group is None else f"{self.group}/{self.perturbation}"


def parse_embed(embed: str | None) -> tuple[str, int] | None:
    """("pca" | "ae", K) of an embed spec "pca:K" or "ae:K" (K >= 1); None for no embedding."""
    if embed is None:
        return None
    match = re.fullmatch(r"(pca|ae):([0-9]+)", str(embed).strip())
    if match is None or int(match.group(2)) < 1:
        raise DataError(f"bad embed spec {embed!r}; expected 'pca:K' or 'ae:K' with K >= 1")
    return match.group(1), int(match.group(2))


@dataclass(frozen=True)
class DataSpec:
    """What to read from an AnnData and how to turn it into cell tables (see engine.data.prepare)."""

    condition_key: str  # obs column of condition labels
    control: str  # the control label in it
    perturbations: tuple[str, ...] | None = None  # labels to map; None = all but the control
    split_by: str | None = None  # obs column: one map per (group, perturbation), same-group controls
    groups: tuple[str, ...] | None = None  # with split_by: map only these groups' labels; None = every group
    holdout: tuple[str, tuple[str, ...] | str] | None = None  # (KEY, (VALUE, ...)): cells with obs[KEY] in the
    # values are the test split; a single VALUE (configs before several values) becomes (VALUE,)
    preprocess: str = "none"  # none | log1p_normalize | qscale_log1p | arcsinh5
    hvg: int | None = None  # keep the N most highly variable features (Seurat v1 dispersion, train cells)
    embed: str | None = None  # "pca:K" / "ae:K": train in a K-dim PCA / autoencoder latent
    obsm_key: str | None = None  # features from adata.obsm[key] instead of X
    test_fraction: float = 0.2  # per (group, condition), without holdout
    valid_fraction: float = 0.1  # per (group, condition): the valid split (select_on="valid" only)
    select_on: str = "valid"  # where each map's best state is picked: "valid", or "test" (CellOT's protocol)
    min_cells: int = 30  # per (group, condition) used by a map
    markers: int = 50  # marker features per map (|Welch t|)
    seed: int = 0  # split seed
    context_keys: tuple[str, ...] | None = None  # conditional solvers: the condition and/or split-by key
    embeddings: tuple[str, ...] = ()  # "KEY=onehot|value|log|moa" per context key (default onehot)
    growth: dict[str, float] | None = None  # observed cell-count ratio (treated / control) per perturbation
    # label or map name "GROUP/PERTURBATION" (the latter wins): multiplies the predicted weights

    def growth_of(self, key: MapKey) -> float:
        """The observed cell-count ratio of a map (1 when not given): scales its predicted weights."""
        if self.growth is None:
            return 1.0
        return self.growth.get(key.name, self.growth.get(key.perturbation, 1.0))

    def __post_init__(self) -> None:
        if self.perturbations is not None:
            if isinstance(self.perturbations, str) or len(self.perturbations) == 0:
                raise DataError(f"perturbations must be a non-empty list of labels, got {self.perturbations!r}")
            object.__setattr__(self, "perturbations", tuple(str(p) for p in self.perturbations))
        if self.groups is not None:
            if isinstance(self.groups, str) or len(self.groups) == 0:
                raise DataError(f"groups must be a non-empty list of labels, got {self.groups!r}")
            if self.split_by is None:
                raise DataError("a group subset (--only-groups, data.groups) needs --split-by, the key of the groups")
            object.__setattr__(self, "groups", tuple(str(g) for g in self.groups))
        if self.holdout is not None:
            if isinstance(self.holdout, str) or len(self.holdout) != 2:
                raise DataError(f"holdout must be a (KEY, VALUES) pair, got {self.holdout!r}")
            key, values = self.holdout
            values = (str(values),) if isinstance(values, (str, int, float)) else tuple(str(v) for v in values)
            if not values or len(set(values)) < len(values):
                raise DataError(f"holdout {key}: expected distinct values, got {name_some(list(values))}")
            object.__setattr__(self, "holdout", (str(key), values))
        if self.preprocess not in PREPROCESSING:
            raise DataError(f"unknown preprocess {self.preprocess!r}; expected one of {', '.join(PREPROCESSING)}")
        parse_embed(self.embed)
        if not 0.0 < self.test_fraction < 1.0:
            raise DataError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if self.select_on not in SELECT_ON:
            raise DataError(f"unknown select_on {self.select_on!r}; expected one of {', '.join(SELECT_ON)}")
        if self.select_on == "valid":
            if not 0.0 < self.valid_fraction < 1.0:
                raise DataError(f"valid_fraction must be in (0, 1), got {self.valid_fraction!r}")
            if self.test_fraction + self.valid_fraction >= 1.0:
                raise DataError(
                    f"test_fraction + valid_fraction must be < 1, got {self.test_fraction!r} + {self.valid_fraction!r}"
                )
        if self.hvg is not None and int(self.hvg) < 1:
            raise DataError(f"hvg must be >= 1 (or unset for all features), got {self.hvg!r}")
        for name in ("min_cells", "markers"):
            if int(getattr(self, name)) < 1:
                raise DataError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.context_keys is not None:
            self._check_context_keys()
        elif self.embeddings:
            raise DataError("embeddings need context keys (--context-keys)")
        if int(self.seed) < 0:
            raise DataError(f"seed must be >= 0, got {self.seed!r}")
        if self.growth is not None:
            bad = {k: v for k, v in self.growth.items() if not (isinstance(v, (int, float)) and 0 < v < float("inf"))}
            if bad or not self.growth:
                raise DataError(f"growth factors must be a non-empty mapping of labels to numbers > 0, got {bad or self.growth!r}")
            object.__setattr__(self, "growth", {str(k): float(v) for k, v in self.growth.items()})

    def _check_context_keys(self) -> None:
        """Context keys: a non-empty subset of (condition key, split-by key), the split-by key included
        (a group's maps need their own contexts); embeddings name context keys only."""
        keys = self.context_keys
        if isinstance(keys, str) or len(keys) == 0 or len(set(keys)) != len(keys):
            raise DataError(f"context_keys must be a non-empty list of distinct obs keys, got {keys!r}")
        object.__setattr__(self, "context_keys", tuple(str(k) for k in keys))
        allowed = (self.condition_key, *((self.split_by,) if self.split_by else ()))
        other = [k for k in self.context_keys if k not in allowed]
        if other:
            raise DataError(f"context key(s) {name_some(other)} must be the condition key {self.condition_key!r}"
                            + (f" or the split-by key {self.split_by!r}" if self.split_by else "")
                            + " (a context is a map's labels)")
        if self.split_by and self.split_by not in self.context_keys:
            raise DataError(f"with --split-by {self.split_by}, it must be a context key too (each group's maps "
                            "need their own contexts)")
        object.__setattr__(self, "embeddings", tuple(str(e) for e in self.embeddings))
        kinds = parse_embeddings(self.embeddings, self.context_keys)
        if any(kind == "moa" and key != self.condition_key for key, kind in kinds.items()):
            raise DataError(f"embedding moa places perturbations by their effect: only the condition key "
                            f"{self.condition_key!r} can have it")

    @property
    def holdout_text(self) -> str:
        """"KEY='V1','V2'" for messages ("" without a holdout)."""
        return "" if self.holdout is None else f"{self.holdout[0]}={','.join(map(repr, self.holdout[1]))}"

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits made: ("train", "valid", "test"), or ("train", "test") when select_on == "test"."""
        return ("train", "valid", "test") if self.select_on == "valid" else ("train", "test")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataSpec:
        """Build from a json/yaml mapping (typed: lists become tuples); bad keys or values are a DataError."""
        return parse_options(cls, d, "data spec")

    def to_dict(self) -> dict[str, Any]:
        """A json/yaml-safe mapping (tuples become lists) that ``from_dict`` turns back into this spec."""
        d = dataclasses.asdict(self)
        for key in ("perturbations", "groups", "context_keys", "embeddings"):
            if d[key] is not None:
                d[key] = list(d[key])
        if self.holdout is not None:
            d["holdout"] = [self.holdout[0], list(self.holdout[1])]
        return d
