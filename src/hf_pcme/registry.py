"""Checking a name against its valid choices, with errors that list them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def check_choice(value: T, choices: Iterable[Any], what: str) -> T:
    """Return ``value`` if it is one of ``choices``, else raise a ``ValueError`` listing them.

    >>> check_choice("csd", ("cosine", "csd"), "metric")
    'csd'
    """
    choices = tuple(choices)
    if value not in choices:
        listed = ", ".join(sorted(str(choice) for choice in choices))
        raise ValueError(f"Unknown {what} {value!r}; valid choices are: {listed}.")
    return value


def lookup(registry: Mapping[str, Any], name: str, what: str) -> Any:
    """Return ``registry[name]`` or raise a ``ValueError`` naming the valid choices.

    >>> lookup({"a": 1}, "a", "loss")
    1
    """
    return registry[check_choice(name, registry, what)]
