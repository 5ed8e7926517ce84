"""Enum-valued settings: a bad value is an error that names the key and the valid values."""

from __future__ import annotations

import enum
from typing import TypeVar

E = TypeVar("E", bound=enum.Enum)


def coerce(cls: type[E], value, key: str) -> E:
    """`cls(value)`, or ValueError "key='x' is not one of: a, b, c"."""
    try:
        return cls(value)
    except ValueError:
        valid = ", ".join(str(m.value) for m in cls)
        raise ValueError(f"{key}={value!r} is not one of: {valid}") from None
