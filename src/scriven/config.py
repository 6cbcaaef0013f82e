"""Typed, validated configuration: dataclasses that refuse unknown keys and out-of-range values."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, TypeVar

from .errors import ScrivenError

C = TypeVar("C")


def from_dict(cls: type[C], data: dict[str, Any], where: str = "") -> C:
    """Build the dataclass `cls` from `data`; unknown keys are an error, so a typo never trains
    the wrong model silently."""
    if not isinstance(data, dict):
        raise ScrivenError(f"{where or cls.__name__}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ScrivenError(
            f"{where or cls.__name__}: unknown key(s) {', '.join(unknown)}; "
            f"known keys are {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        # JSON has no tuples: lists come back for tuple-typed fields.
        if isinstance(value, list) and "tuple" in str(hints.get(key, "")):
            value = tuple(value)
        values[key] = value
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def check(condition: bool, name: str, message: str) -> None:
    """Raise a ScrivenError naming the parameter unless `condition` holds."""
    if not condition:
        raise ScrivenError(f"{name} {message}")


def check_positive_int(value: Any, name: str, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    check(ok, name, f"must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")


def check_float(value: Any, name: str, low: float, high: float, low_open: bool = False,
                high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    check(ok, name, f"must be a number in {lo}{low}, {high}{hi}, got {value!r}")
