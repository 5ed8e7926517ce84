"""ConfigDict ⇄ typed config, in one place.

    config = to_config(GRPORun())            # a ConfigDict with every key and its default
    run = parse(config)                       # back to the frozen, typed run of its `stage`

`to_config` writes enums as their string values and None as a typed placeholder, so a command
line can set every key (`--config.rollout.top_k=20`). `parse` checks every key against the
dataclass it belongs to and converts it, and every problem names the dotted key:

    config.rollout.old_logprobs='foo' is not one of: auto, sampler, recompute
    unknown config key 'sft.stepz'; valid keys under 'sft': batch_size, chunk_size, …
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from opera_jax.reward.config import RewardConfig

# Fields of library dataclasses that the loop sets, not the config.
_NOT_CONFIG = {RewardConfig: ("group_size",)}


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the dotted key."""


def _fields(cls) -> list[dataclasses.Field]:
    skip = _NOT_CONFIG.get(cls, ())
    return [f for f in dataclasses.fields(cls) if f.init and f.name not in skip]


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_optional(tp) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def _placeholder_type(tp):
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return str
    if typing.get_origin(tp) is tuple:
        return tuple
    return tp


def to_config(obj) -> ml_collections.ConfigDict:
    """A ConfigDict of a dataclass instance: nested sections, enums as values, None as a
    typed placeholder (settable from the command line)."""
    out = ml_collections.ConfigDict()
    hints = _hints(type(obj))
    for f in _fields(type(obj)):
        value = getattr(obj, f.name)
        base, _ = _split_optional(hints[f.name])
        if dataclasses.is_dataclass(value):
            out[f.name] = to_config(value)
        elif value is None:
            out[f.name] = config_dict.placeholder(_placeholder_type(base))
        elif isinstance(value, enum.Enum):
            out[f.name] = value.value
        else:
            out[f.name] = value
    return out


def from_config(cls, config, where: str = "config"):
    """The dataclass `cls` from a ConfigDict (or dict) section; missing keys take defaults.

    Raises:
      ConfigError: an unknown key (listing the valid ones) or a value of the wrong kind.
    """
    if not hasattr(config, "keys"):
        raise ConfigError(f"{where} must be a section (a ConfigDict), got {config!r}")
    fields = {f.name: f for f in _fields(cls)}
    unknown = sorted(set(config.keys()) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key '{where}.{unknown[0]}'; valid keys under "
                          f"{where!r}: {', '.join(sorted(fields))}")
    hints, kwargs = _hints(cls), {}
    for name in fields:
        if name in config:
            kwargs[name] = _convert(hints[name], config[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _convert(tp, value, key: str):
    base, optional = _split_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} must be set (it has no 'unset' meaning)")
    if dataclasses.is_dataclass(base):
        return from_config(base, value, key)
    if isinstance(base, type) and issubclass(base, enum.Enum):
        try:
            return base(value)
        except ValueError:
            valid = ", ".join(str(m.value) for m in base)
            raise ConfigError(f"{key}={value!r} is not one of: {valid}") from None
    if typing.get_origin(base) is tuple:
        if isinstance(value, str) or not isinstance(value, (tuple, list)):
            raise ConfigError(f"{key} must be a tuple, got {value!r}")
        return tuple(value)
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    return value
