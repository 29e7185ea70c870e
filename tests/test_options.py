"""engine.options: typed parsing of option mappings, one unknown-key check, one error type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import pytest

from engine.options import DataError, parse_options, to_plain


@dataclass(frozen=True)
class Solver:
    hidden: tuple[int, ...] = (64, 64)
    betas: tuple[float, float] = (0.5, 0.9)
    lr: float = 1e-3
    inner_steps: int = 10
    amsgrad: bool = False
    seed: int | None = None
    embed: str | None = "pca:50"
    kind: Literal["icnn", "mlp"] = "icnn"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Spec:
    condition_key: str  # required
    control: str  # required
    holdout: Optional[tuple[str, str]] = None
    tags: tuple = ()


def solver(**raw: Any) -> Solver:
    return parse_options(Solver, raw, "solver")


def error(cls: type, raw: Any, section: str = "solver") -> str:
    with pytest.raises(DataError) as info:
        parse_options(cls, raw, section)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_data_error_is_one_line_value_error():
    err = DataError("first\nsecond\n")
    assert isinstance(err, ValueError) and str(err) == "first second"


def test_defaults_from_none_or_empty():
    assert parse_options(Solver, None, "solver") == Solver() == solver()


@pytest.mark.parametrize(
    "raw, expected",
    [(True, True), (False, False), ("false", False), ("FALSE", False), ("True", True), ("yes", True),
     ("No", False), ("on", True), ("off", False), ("1", True), ("0", False), (1, True), (0, False)],
)
def test_bool(raw, expected):
    assert solver(amsgrad=raw).amsgrad is expected


@pytest.mark.parametrize("raw", ["maybe", "", 2, 0.5, None, [True]])
def test_bad_bool(raw):
    message = error(Solver, {"amsgrad": raw})
    assert message.startswith("solver option 'amsgrad': expected a boolean")


@pytest.mark.parametrize("raw, expected", [(7, 7), ("7", 7), (" -3 ", -3), (4.0, 4), ("1e3", 1000)])
def test_int(raw, expected):
    value = solver(inner_steps=raw).inner_steps
    assert value == expected and type(value) is int


@pytest.mark.parametrize("raw", ["ten", 2.5, True, None, "2.5", float("inf")])
def test_bad_int(raw):
    assert error(Solver, {"inner_steps": raw}).startswith("solver option 'inner_steps': expected an integer, got ")


def test_bad_int_message():
    assert error(Solver, {"inner_steps": "ten"}) == "solver option 'inner_steps': expected an integer, got 'ten'"


@pytest.mark.parametrize("raw, expected", [(0.01, 0.01), (2, 2.0), ("1e-4", 1e-4), (" 0.5", 0.5)])
def test_float(raw, expected):
    value = solver(lr=raw).lr
    assert value == expected and type(value) is float


@pytest.mark.parametrize("raw", ["fast", False, None, [0.1]])
def test_bad_float(raw):
    assert "solver option 'lr': expected a number" in error(Solver, {"lr": raw})


def test_str_from_numbers_and_bad_str():
    spec = parse_options(Spec, {"condition_key": "drug", "control": 1}, "data spec")
    assert spec.control == "1"
    assert parse_options(Spec, {"condition_key": 2.5, "control": "c"}, "data spec").condition_key == "2.5"
    assert error(Spec, {"condition_key": "drug", "control": True}, "data spec") == (
        "data spec option 'control': expected a string, got True"
    )


def test_optional_none_default_accepted_and_overridden():
    assert solver().seed is None and solver(seed=None).seed is None
    assert solver(seed=3).seed == 3 and solver(seed="3").seed == 3
    assert solver(seed="null").seed is None and solver(seed="None").seed is None
    assert solver(embed="pca:10").embed == "pca:10" and solver(embed="none").embed is None
    assert error(Solver, {"seed": "abc"}) == "solver option 'seed': expected an integer or null, got 'abc'"


def test_none_for_non_optional_is_an_error():
    assert error(Solver, {"lr": None}) == "solver option 'lr': expected a number, got None"


def test_tuple_variadic():
    assert solver(hidden=[128, "32", 8.0]).hidden == (128, 32, 8)
    assert solver(hidden=[]).hidden == () and solver(hidden=(1,)).hidden == (1,)
    assert error(Solver, {"hidden": [64, "x"]}) == "solver option 'hidden'[1]: expected an integer, got 'x'"


def test_tuple_fixed_length():
    assert solver(betas=[0, "0.99"]).betas == (0.0, 0.99)
    message = error(Solver, {"betas": [0.9, 0.99, 0.5]})
    assert message == "solver option 'betas': expected a list of 2 items (a number, a number), got [0.9, 0.99, 0.5]"
    assert "solver option 'betas'" in error(Solver, {"betas": [0.9]})


@pytest.mark.parametrize("raw", ["64,64", 64, {"a": 1}])
def test_scalar_for_tuple_is_an_error(raw):
    assert error(Solver, {"hidden": raw}).startswith("solver option 'hidden': expected a list (each item an integer)")


def test_optional_tuple_and_bare_tuple():
    base = {"condition_key": "drug", "control": "ctrl"}
    assert parse_options(Spec, base, "data spec").holdout is None
    assert parse_options(Spec, {**base, "holdout": ["batch", 2]}, "data spec").holdout == ("batch", "2")
    assert parse_options(Spec, {**base, "tags": ["a", 1]}, "data spec").tags == ("a", 1)
    message = error(Spec, {**base, "holdout": "batch"}, "data spec")
    assert message == "data spec option 'holdout': expected a list of 2 items (a string, a string) or null, got 'batch'"
    assert error(Spec, {**base, "holdout": ["a", None]}, "data spec").startswith("data spec option 'holdout'[1]:")


def test_literal():
    assert solver(kind="mlp").kind == "mlp"
    assert error(Solver, {"kind": "cnn"}) == "solver option 'kind': expected one of 'icnn', 'mlp', got 'cnn'"


def test_dict_and_any_pass_through():
    extra = {"a": [1, 2], "b": None}
    assert solver(extra=extra).extra is extra


def test_unknown_keys():
    message = error(Solver, {"lrr": 0.1, "lr": 0.1, "Hidden": 1})
    assert message == (
        "unknown solver option(s) 'Hidden', 'lrr'; known: amsgrad, betas, embed, extra, hidden, "
        "inner_steps, kind, lr, seed"
    )


def test_missing_required():
    assert error(Spec, {"control": "ctrl"}, "data spec") == "missing required data spec option(s) 'condition_key'"
    assert "'condition_key', 'control'" in error(Spec, None, "data spec")


def test_not_a_mapping():
    assert error(Solver, [("lr", 0.1)]).startswith("solver options: expected a mapping")


def test_long_values_are_cut_in_messages():
    message = error(Solver, {"lr": "x" * 500})
    assert message.endswith("...") and len(message) < 120


def test_to_plain_round_trips():
    raw = to_plain(Solver(hidden=(8, 4), extra={"nested": [(1, 2), {"t": (3,)}]}))
    assert raw["hidden"] == [8, 4] and raw["betas"] == [0.5, 0.9]
    assert raw["extra"] == {"nested": [[1, 2], {"t": [3]}]}
    assert parse_options(Solver, raw, "solver") == Solver(hidden=(8, 4), extra=raw["extra"])
    assert to_plain({"a": (1, (2, 3)), "b": "s", "c": None}) == {"a": [1, [2, 3]], "b": "s", "c": None}
