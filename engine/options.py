"""Typed options from plain mappings: one error type, one unknown-key check, one coercion.

Solver options, config sections and data specs arrive as plain mappings (YAML, JSON,
``--set KEY=VALUE``) whose values are strings, numbers, lists or None. ``parse_options``
builds a dataclass from such a mapping, rejecting unknown and missing keys by name and
coercing each value to its field's annotated type (so the string "false" is False, not
True). This module imports nothing from ``engine``: it sits at the bottom of the import graph.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_NULL = frozenset({"none", "null"})


class DataError(ValueError):
    """Bad input: data, spec or options; ``str(err)`` is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


class _Mismatch(Exception):
    """A value that does not fit a type, at ``where`` (a key, or a key and item indices)."""

    def __init__(self, where: str, expected: str, value: Any) -> None:
        super().__init__(where, expected, value)
        self.where, self.expected, self.value = where, expected, value


def parse_options(cls: type[T], raw: Mapping[str, Any] | None, section: str) -> T:
    """Build dataclass ``cls`` from ``raw``, coercing each value to its field's annotated type.

    ``section`` names the options in messages ("solver" gives "unknown solver option(s) ...").
    Unknown keys, missing required fields and values that do not fit are a DataError naming
    the section and the key. Fields left out keep their defaults (which are not coerced).
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise DataError(f"{section} options: expected a mapping of option names to values, got {_show(raw)}")
    fields = [f for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    names = [f.name for f in fields]
    unknown = sorted((str(k) for k in raw if k not in names))
    if unknown:
        raise DataError(
            f"unknown {section} option(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(names))}"
        )
    missing = [
        f.name
        for f in fields
        if f.name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise DataError(f"missing required {section} option(s) {', '.join(map(repr, missing))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        try:
            values[key] = _coerce(value, hints.get(key, Any), repr(key))
        except _Mismatch as err:
            raise DataError(f"{section} option {err.where}: expected {err.expected}, got {_show(err.value)}") from None
    return cls(**values)


def to_plain(value: Any) -> Any:
    """Tuples to lists, recursively inside mappings, lists and dataclasses (YAML/JSON-safe)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` as type ``tp``; raises _Mismatch when it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return _to_bool(value, where)
    if tp is int:
        return _to_int(value, where)
    if tp is float:
        return _to_float(value, where)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return str(value)  # a label such as control "1", read by YAML as an int
        raise _Mismatch(where, "a string", value)
    if origin is Union or origin is types.UnionType:
        return _to_union(value, args, where)
    if tp is tuple or origin is tuple:
        return _to_tuple(value, args, where)
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        raise _Mismatch(where, f"one of {', '.join(map(repr, args))}", value)
    return value  # dict, Any, anything else: as given


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _Mismatch(where, "a boolean (true/false, yes/no, on/off, 1/0)", value)


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                value_f = float(value.strip())  # "1e3": PyYAML reads it as a string
            except ValueError:
                value_f = math.nan
            if math.isfinite(value_f) and value_f.is_integer():
                return int(value_f)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        if math.isfinite(value) and float(value).is_integer():
            return int(value)
    raise _Mismatch(where, "an integer", value)


def _to_float(value: Any, where: str) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _Mismatch(where, "a number", value)


def _to_union(value: Any, args: tuple[Any, ...], where: str) -> Any:
    """The first member type that ``value`` fits; None (or "none"/"null") for an optional."""
    optional = type(None) in args
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in _NULL)):
        return None
    expected = []
    for member in args:
        if member is type(None):
            continue
        try:
            return _coerce(value, member, where)
        except _Mismatch as err:
            if err.where != where:  # an item of a list was wrong: report that item
                raise
            expected.append(err.expected)
    raise _Mismatch(where, " or ".join(expected + (["null"] if optional else [])), value)


def _to_tuple(value: Any, args: tuple[Any, ...], where: str) -> tuple[Any, ...]:
    """A list or tuple, item by item; ``tuple[A, B]`` checks the length, ``tuple[T, ...]`` does not."""
    variadic = len(args) == 2 and args[1] is Ellipsis
    bare = not args or args == ((),)  # plain ``tuple``: items as given
    if bare:
        expected = "a list"
    elif variadic:
        expected = f"a list (each item {_describe(args[0])})"
    else:
        expected = f"a list of {len(args)} items ({', '.join(map(_describe, args))})"
    if not isinstance(value, (list, tuple)):
        raise _Mismatch(where, expected, value)
    if bare:
        return tuple(value)
    if not variadic and len(value) != len(args):
        raise _Mismatch(where, expected, value)
    item_types = (args[0],) * len(value) if variadic else args
    return tuple(_coerce(item, tp, f"{where}[{i}]") for i, (item, tp) in enumerate(zip(value, item_types)))


def _describe(tp: Any) -> str:
    """A few words for what ``tp`` accepts, for messages about list items."""
    try:  # every checked type rejects a bare object() and says what it expected
        _coerce(object(), tp, "")
    except _Mismatch as err:
        return err.expected
    return "anything"


def _show(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters, for one-line messages."""
    text = " ".join(repr(value).splitlines())
    return text if len(text) <= limit else text[: limit - 3] + "..."
