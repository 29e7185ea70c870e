"""The fully resolved configuration of a run: data, solver, training loop, cluster.

It round-trips through plain dicts (config.yaml in the run directory, job specs, `--set a.b=v`
overrides) and is what checkpoints carry, so a run can be reproduced or resumed from its directory.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.data import DataError, DataSpec
from engine.solvers import solver_class
from engine.solvers.base import make_config
from engine.train.loop import TrainConfig


@dataclass
class ClusterConfig:
    address: str = "local"  # local (in-process Ray) | auto | ray://host:port
    workers: int = 1  # Ray Train workers; each owns whole maps
    gpus_per_worker: float = 0.0  # 0 = CPU workers with one torch thread each; fractions allowed


@dataclass
class RunConfig:
    dataset: str  # path of the input h5ad
    data: DataSpec
    solver: str = "cellot"
    solver_params: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        make_config(solver_class(self.solver).Config, self.solver_params)  # fail early on bad options

    def solver_config(self) -> Any:
        return make_config(solver_class(self.solver).Config, self.solver_params)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe dict with every default filled in (solver options included)."""
        solver = {"name": self.solver, **_plain(dataclasses.asdict(self.solver_config()))}
        return {
            "dataset": self.dataset,
            "data": _plain(self.data.to_dict()),
            "solver": solver,
            "train": dataclasses.asdict(self.train),
            "cluster": dataclasses.asdict(self.cluster),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        unknown = sorted(set(raw) - {"dataset", "data", "solver", "train", "cluster"})
        if unknown:
            raise DataError(f"unknown config section(s) {', '.join(unknown)}")
        solver = dict(raw.get("solver") or {})
        return cls(
            dataset=str(raw["dataset"]),
            data=DataSpec.from_dict(raw["data"]),
            solver=solver.pop("name", "cellot"),
            solver_params=solver,
            train=_section(TrainConfig, raw.get("train")),
            cluster=_section(ClusterConfig, raw.get("cluster")),
        )

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))


def apply_overrides(raw: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
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


def _section(cls: type, raw: dict[str, Any] | None) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw or {}) - names)
    if unknown:
        raise DataError(f"unknown {cls.__name__} option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**(raw or {}))


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively (YAML-safe)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
