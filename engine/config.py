"""The fully resolved configuration of a run: data, solver, training loop, cluster.

It round-trips through plain dicts (config.yaml in the run directory, job specs, `--set a.b=v`
overrides) and is what checkpoints carry, so a run can be reproduced or resumed from its directory.
`RunConfig.resolve` is the one place where a config file, flags and overrides meet (CLI and API).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from engine.data import DataSpec
from engine.options import DataError, parse_options, to_plain
from engine.solvers import solver_class
from engine.solvers.base import StackSolver, make_config
from engine.train.device import parse_device
from engine.train.loop import TrainConfig

SECTIONS = ("dataset", "data", "solver", "train", "cluster")
DATA_FLAGS = ("condition_key", "control", "perturbations", "split_by", "groups", "holdout", "preprocess", "hvg", "embed",
              "obsm_key", "select_on", "context_keys", "embeddings", "growth")
TRAIN_FLAGS = ("steps", "device")
CLUSTER_FLAGS = ("address", "workers", "gpus_per_worker")


@dataclass
class ClusterConfig:
    address: str = "local"  # local (in-process Ray) | auto | ray://host:port
    workers: int = 1  # Ray Train workers; each owns whole maps
    gpus_per_worker: float = 0.0  # 0 = CPU workers with one torch thread each; fractions allowed

    def __post_init__(self) -> None:
        if self.workers < 1 or self.gpus_per_worker < 0:
            raise DataError(f"cluster.workers must be >= 1 and gpus_per_worker >= 0, got {self.workers}, {self.gpus_per_worker}")


@dataclass
class RunConfig:
    dataset: str  # path of the input h5ad
    data: DataSpec
    solver: str = "cellot"
    solver_params: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        self.solver_config()  # fail early on an unknown solver or bad options
        if self.train.steps < 1:
            raise DataError(f"train.steps must be >= 1 (an untrained map is not a result), got {self.train.steps}")
        if self.data.context_keys and not self.solver_cls.shared:
            raise DataError(f"context keys are for a conditional solver (condot); {self.solver} trains one map per "
                            "perturbation and ignores them")
        if parse_device(self.train.device)[0] == "cpu" and self.cluster.gpus_per_worker > 0:
            raise DataError(f"device cpu contradicts gpus_per_worker={self.cluster.gpus_per_worker}")

    @property
    def solver_cls(self) -> type[StackSolver]:
        return solver_class(self.solver)

    def solver_config(self) -> Any:
        return make_config(self.solver_cls.Config, self.solver_params)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe dict with every default filled in (solver options included)."""
        return {
            "dataset": self.dataset,
            "data": to_plain(self.data.to_dict()),
            "solver": {"name": self.solver, **to_plain(dataclasses.asdict(self.solver_config()))},
            "train": dataclasses.asdict(self.train),
            "cluster": dataclasses.asdict(self.cluster),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        if not isinstance(raw, dict):
            raise DataError(f"a run config is a mapping with sections {', '.join(SECTIONS)}, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise DataError(f"unknown config section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
        if "dataset" not in raw or "data" not in raw:
            raise DataError("a run config needs `dataset` (--data) and a `data` section with condition_key and "
                            "control (--condition-key, --control)")
        if not isinstance(raw.get("solver") or {}, dict):
            raise DataError(f"the solver section is a mapping (name: ..., options), got {raw['solver']!r}")
        solver = dict(raw.get("solver") or {})
        return cls(
            dataset=str(raw["dataset"]),
            data=DataSpec.from_dict(raw["data"] or {}),
            solver=str(solver.pop("name", "cellot")),
            solver_params=solver,
            train=parse_options(TrainConfig, raw.get("train"), "train"),
            cluster=parse_options(ClusterConfig, raw.get("cluster"), "cluster"),
        )

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))

    @classmethod
    def resolve(cls, file: str | Path | None = None, overrides: Sequence[str] = (), **flags: Any) -> "RunConfig":
        """A config file (YAML with sections dataset, data, solver, train, cluster), then the flags
        that are not None, then `section.key=value` overrides (values parsed as YAML), in that order.

        flags: dataset, solver, seed (data and train), published (the solver's `published` settings and
        step count, under explicit flags), solver_params / train_params
        (dicts merged into their sections), and the keys of DATA_FLAGS, TRAIN_FLAGS, CLUSTER_FLAGS.
        """
        raw: dict[str, Any] = {}
        if file is not None:
            try:
                raw = yaml.safe_load(Path(file).read_text()) or {}
            except (OSError, yaml.YAMLError) as error:
                raise DataError(f"cannot read config {file}: {error}") from error
            if not isinstance(raw, dict):
                raise DataError(f"{file}: expected a YAML mapping with sections {', '.join(SECTIONS)}")
        known = {"dataset", "solver", "seed", "published", "solver_params", "train_params",
                 *DATA_FLAGS, *TRAIN_FLAGS, *CLUSTER_FLAGS}
        unknown = sorted(set(flags) - known)
        if unknown:
            raise TypeError(f"RunConfig.resolve got unknown flag(s) {', '.join(unknown)}")
        given = {k: v for k, v in flags.items() if v is not None}
        if "dataset" in given:
            raw["dataset"] = str(given["dataset"])
        sections = {name: dict(raw.get(name) or {}) for name in ("data", "solver", "train", "cluster")}
        for names, section in ((DATA_FLAGS, "data"), (TRAIN_FLAGS, "train"), (CLUSTER_FLAGS, "cluster")):
            sections[section].update({k: given[k] for k in names if k in given})
        if "seed" in given:
            sections["data"]["seed"] = sections["train"]["seed"] = given["seed"]
        sections["solver"]["name"] = given.get("solver", sections["solver"].get("name", "cellot"))
        if given.get("published"):
            solver = solver_class(sections["solver"]["name"])
            if not solver.published_steps:
                raise DataError(f"solver {solver.name} has no published configuration")
            sections["solver"].update(solver.published)
            if "steps" not in given:
                sections["train"]["steps"] = solver.published_steps
        sections["solver"].update(given.get("solver_params", {}))
        sections["train"].update(given.get("train_params", {}))
        raw.update(sections)
        return cls.from_dict(apply_overrides(raw, overrides))


def apply_overrides(raw: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """Apply `section.key=value` assignments (values parsed as YAML) to a config dict, in place."""
    for assignment in assignments:
        path, sep, value = assignment.partition("=")
        if not sep or not path:
            raise DataError(f"--set expects key=value (e.g. train.steps=500), got {assignment!r}")
        *parents, leaf = path.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise DataError(f"--set {path}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    return raw
