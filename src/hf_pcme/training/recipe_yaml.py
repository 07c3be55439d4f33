"""Recipe text: the YAML loader recipes are read with, and dotted ``key=value`` overrides.

Override values are parsed as YAML scalars (``20`` -> int, ``1e-4`` -> float, ``true`` -> bool,
``null`` -> None, ``[vision]`` -> list), so they have the same types as in the file.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml


class _RecipeLoader(yaml.SafeLoader):
    """YAML loader that also reads ``1e-4`` as a float (YAML 1.1, and so PyYAML, needs ``1.0e-4``)."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML text with the recipe loader (``1e-4`` is a float)."""
    return yaml.load(text, Loader=_RecipeLoader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b.c=value"`` into ``(["a", "b", "c"], parsed value)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"Override {text!r} must look like 'section.key=value' (e.g. train.max_steps=20).")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"Override {text!r} has an empty key; write 'section.key=value'.")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ValueError(f"Override {text!r}: cannot parse the value {raw!r} as YAML ({error}).") from None
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the nested ``values`` with each dotted ``key=value`` override set."""
    values = copy.deepcopy(values)
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for depth, part in enumerate(path[:-1]):
            if isinstance(node, list):  # a list section (stages): the part is an index
                node = _list_item(node, part, text)
                continue
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, (dict, list)):
                raise ValueError(f"Override {text!r}: {'.'.join(path[: depth + 1])!r} is not a section.")
            node = child
        if isinstance(node, list):
            node[_list_index(node, path[-1], text)] = value
        else:
            node[path[-1]] = value
    return values


def _list_index(items: list, part: str, text: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ValueError(f"Override {text!r}: {part!r} is not an index of a list of {len(items)} item(s).")
    return int(part)


def _list_item(items: list, part: str, text: str) -> dict:
    item = items[_list_index(items, part, text)]
    if not isinstance(item, dict):
        raise ValueError(f"Override {text!r}: item {part} is not a section.")
    return item


__all__ = ["apply_overrides", "parse_override", "parse_yaml"]
