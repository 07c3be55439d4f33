"""Check nested recipe values against typed dataclasses, with errors that name the key.

:func:`build_section` turns a mapping into a dataclass instance, checking each value against the
field's annotation (``int``, ``float``, ``str``, ``bool``, ``dict``, ``Literal[...]``, ``list[...]``,
unions and nested dataclasses; an int is accepted for a float); an unknown key lists the valid
keys of its section with a close match when there is one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(item)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _wrong_type(key: str, tp: Any, value: Any) -> ValueError:
    return ValueError(f"Recipe key {key!r} must be {_type_name(tp)}, got {value!r} ({type(value).__name__}).")


_SCALARS = {  # annotation -> which values it accepts (bool is an int in Python, but not a recipe int)
    type(None): lambda v: v is None,
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    dict: lambda v: isinstance(v, dict),
}


def convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting int -> float); raise naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"Recipe key {key!r} must be a mapping of its keys, got {value!r}.")
        return build_section(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return convert(value, arg, key)
            except ValueError:
                pass
        raise _wrong_type(key, tp, value)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value is False and "no" in choices:
            return "no"  # YAML 1.1 reads a bare `no` as false (mixed_precision: no)
        if value in choices and not isinstance(value, bool):
            return value
        raise ValueError(f"Recipe key {key!r} must be {_type_name(tp)}, got {value!r}.")
    if origin is list:
        if not isinstance(value, list):
            raise _wrong_type(key, tp, value)
        (item,) = typing.get_args(tp) or (Any,)
        return [convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp not in _SCALARS:  # pragma: no cover - recipes use only the annotations above
        raise TypeError(f"Unsupported recipe annotation {tp!r} for {key!r}.")
    if not _SCALARS[tp](value):
        raise _wrong_type(key, tp, value)
    return float(value) if tp is float else value


def unknown_key_error(section: str, name: str, valid: list[str]) -> ValueError:
    """The error for an unknown key: names it, suggests the closest valid key, lists them all."""
    full = f"{section}.{name}" if section else name
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {(f'{section}.{close[0]}' if section else close[0])!r}?" if close else ""
    where = f"section {section!r}" if section else "the top level"
    return ValueError(f"Unknown recipe key {full!r}.{hint} Valid keys of {where} are: {', '.join(valid)}.")


def build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    """An instance of the dataclass ``cls`` from ``values``, each checked against its field's annotation."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        if name not in hints or name not in valid:
            raise unknown_key_error(section, str(name), valid)
        key = f"{section}.{name}" if section else name
        kwargs[name] = convert(value, hints[name], key)
    return cls(**kwargs)


__all__ = ["build_section", "convert", "unknown_key_error"]
