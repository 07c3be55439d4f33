"""A tiny name -> class registry whose errors list the valid choices."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def lookup(registry: Mapping[str, Any], name: str, what: str) -> Any:
    """Return ``registry[name]`` or raise a ``ValueError`` naming the valid choices.

    >>> lookup({"a": 1}, "a", "loss")
    1
    """
    try:
        return registry[name]
    except KeyError:
        choices = ", ".join(sorted(registry))
        raise ValueError(f"Unknown {what} {name!r}; valid choices are: {choices}.") from None
