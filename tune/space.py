"""A search space: which solver and training options a search varies, and over what.

A space is a YAML mapping from a config path (`solver.<option>` or `train.<option>`) to one
distribution:

    solver.lr: {loguniform: [1.0e-5, 1.0e-2]}           # log-uniform on [lo, hi]
    solver.final_lr_fraction: {uniform: [0.0, 0.1]}     # uniform on [lo, hi]
    solver.init: {choice: [uniform, identity, gaussian]}
    solver.betas: {choice: [[0.5, 0.9], [0.9, 0.999]]}  # any YAML value, lists included
    solver.hidden: {layers: {width: [32, 64, 128], depth: [3, 4, 5]}}   # (width,) * depth

Each solver ships one in `tune/spaces/<solver>.yaml` (`--space FILE` replaces it). A space is
checked when loaded: every value it can take (the bounds, every choice) must be a valid option of
the solver or the training loop, and none may change the plan's phases (ASHA compares trials at
the same reports, so every trial must report at the same steps; e.g. W1OT's potential_fraction).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.config import RunConfig
from engine.options import DataError

SPACES = Path(__file__).resolve().parent / "spaces"
KINDS = ("loguniform", "uniform", "choice", "layers")
FIXED = ("train.steps", "train.eval_every", "train.device")  # the search's budget, cadence and device
PRIMITIVE = (str, int, float, bool, type(None))


def default_space(solver: str) -> Path:
    """The space shipped for `solver`; a DataError naming the solvers that have one."""
    path = SPACES / f"{solver}.yaml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in SPACES.glob("*.yaml")))
        raise DataError(f"no search space is shipped for solver {solver!r} (shipped: {shipped}); give one with --space")
    return path


@dataclass(frozen=True)
class SearchSpace:
    """Distributions by config path; `sample_space()` for Tune, `decode()` back to option values."""

    entries: dict[str, dict[str, Any]]

    @classmethod
    def load(cls, path: str | Path, base: RunConfig) -> "SearchSpace":
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as error:
            raise DataError(f"cannot read search space {path}: {error}") from error
        return cls.parse(raw, base, str(path))

    @classmethod
    def parse(cls, raw: Any, base: RunConfig, where: str = "search space") -> "SearchSpace":
        """Check a space's form and every value it can take against `base` (see the module doc)."""
        if not isinstance(raw, dict) or not raw:
            raise DataError(f"{where}: expected a mapping of config paths (solver.x, train.y) to distributions")
        for path, spec in raw.items():
            section, _, option = str(path).partition(".")
            if section not in ("solver", "train") or not option or "." in option or path == "solver.name":
                raise DataError(f"{where}: {path!r} is not a solver.<option> or train.<option> path")
            if path in FIXED:
                raise DataError(f"{where}: {path} is set by the search itself (--steps, train.eval_every, --device)")
            if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in KINDS):
                raise DataError(f"{where}: {path}: expected one of {', '.join(KINDS)} (e.g. {{choice: [1, 2]}}), got {spec!r}")
            _check_spec(where, path, *next(iter(spec.items())))
        space = cls({str(k): v for k, v in raw.items()})
        space._check_values(base, where)
        return space

    def _check_values(self, base: RunConfig, where: str) -> None:
        """Every bound and choice is a valid option alone, and leaves the plan's phases as they are."""
        plan = base.solver_cls.plan(base.solver_config(), base.train.steps).describe()
        for path, spec in self.entries.items():
            kind, args = next(iter(spec.items()))
            values = ([(w,) * d for w in args["width"] for d in args["depth"]] if kind == "layers" else list(args))
            for value in values:
                try:
                    config = configure(base, {path: value})
                except DataError as error:
                    raise DataError(f"{where}: {path}={value!r}: {error}") from None
                if config.solver_cls.plan(config.solver_config(), config.train.steps).describe() != plan:
                    raise DataError(f"{where}: {path}={value!r} changes the plan's phases; ASHA needs every trial "
                                    "to report at the same steps (fix it with --set instead)")

    def sample_space(self) -> dict[str, Any]:
        """Tune's param_space: one Tune domain per searched value (a layers entry is two)."""
        from ray import tune

        space: dict[str, Any] = {}
        for path, spec in self.entries.items():
            kind, args = next(iter(spec.items()))
            if kind == "loguniform":
                space[path] = tune.loguniform(*args)
            elif kind == "uniform":
                space[path] = tune.uniform(*args)
            elif kind == "choice":  # Optuna takes primitive categories only: others travel as JSON text
                space[path] = tune.choice([v if isinstance(v, PRIMITIVE) else json.dumps(v) for v in args])
            else:
                space[f"{path}.width"] = tune.choice(list(args["width"]))
                space[f"{path}.depth"] = tune.choice(list(args["depth"]))
        return space

    def decode(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Option values by config path from what Tune sampled (lists for tuples: YAML-safe)."""
        params: dict[str, Any] = {}
        for path, spec in self.entries.items():
            kind, args = next(iter(spec.items()))
            if kind == "layers":
                params[path] = [int(sampled[f"{path}.width"])] * int(sampled[f"{path}.depth"])
            elif kind == "choice" and not all(isinstance(v, PRIMITIVE) for v in args) and isinstance(sampled[path], str):
                params[path] = json.loads(sampled[path])
            else:
                params[path] = sampled[path]
        return params


def _check_spec(where: str, path: str, kind: str, args: Any) -> None:
    if kind in ("loguniform", "uniform"):
        ok = (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
              and args[0] < args[1] and (kind == "uniform" or args[0] > 0))
        if not ok:
            raise DataError(f"{where}: {path}: {kind} takes [lo, hi] with lo < hi{' and lo > 0' if kind == 'loguniform' else ''}, got {args!r}")
    elif kind == "choice":
        if not isinstance(args, list) or not args:
            raise DataError(f"{where}: {path}: choice takes a non-empty list of values, got {args!r}")
    elif not (isinstance(args, dict) and set(args) == {"width", "depth"}
              and all(isinstance(v, list) and v and all(isinstance(i, int) and i > 0 for i in v) for v in args.values())):
        raise DataError(f"{where}: {path}: layers takes {{width: [ints], depth: [ints]}}, got {args!r}")


def configure(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """`base` with option values set by config path (what a trial trains, and the best config)."""
    raw = base.to_dict()
    for path, value in params.items():
        section, option = path.split(".")
        raw[section][option] = value
    return RunConfig.from_dict(raw)
