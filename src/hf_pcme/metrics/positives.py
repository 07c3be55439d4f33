"""Explicit positives of R-Precision / MAP@R: per-query sets instead of the pairs or the classes.

Sources: ``"pairs"`` (the default), ``"classes"`` (same class, with ``image_classes``), a
``(num_images, num_texts)`` bool matrix, or ``{"i2t": ..., "t2i": ...}`` with per-query item
index lists or a mapping query id -> item ids (ECCV Caption's human-verified positives, Chun et
al., ECCV 2022). Explicit sets are stored as sorted keys ``query * num_items + item`` in the
internal (caption-sorted) order, so a block's counts and membership tests are binary searches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .layout import DIRECTIONS, Layout, index_vector
from .scorers import as_tensor


class ExplicitPositives:
    """Explicit positives of one direction as sorted keys ``query * num_items + item`` (internal order)."""

    def __init__(self, keys: torch.Tensor, num_items: int, unranked: torch.Tensor | None = None) -> None:
        self.keys = torch.unique(keys)
        self.num_items = num_items
        # per query (internal order): positives that are not among the ranked items; they count in R
        self.unranked = unranked

    def counts(self, queries: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Positives of each query among the items ``[start, end)`` (plus the unranked ones over all items)."""
        base = queries * self.num_items
        counts = torch.searchsorted(self.keys, base + end) - torch.searchsorted(self.keys, base + start)
        if self.unranked is not None and (start, end) == (0, self.num_items):
            counts = counts + self.unranked[queries]
        return counts

    def contains(self, queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Whether each ``(query, item)`` pair is a positive."""
        keys = queries * self.num_items + items
        where = torch.searchsorted(self.keys, keys).clamp_max(max(self.keys.numel() - 1, 0))
        if self.keys.numel() == 0:
            return torch.zeros_like(keys, dtype=torch.bool)
        return self.keys[where] == keys


def positives_from_lists(
    value: Any, num_queries: int, num_items: int, query_ids: Any, item_ids: Any, name: str
) -> list[torch.Tensor]:
    """Per-query item indices from a list of index lists, or a mapping id -> ids."""
    if isinstance(value, Mapping):
        value = _lists_from_ids(value, num_queries, query_ids, item_ids, name)
    if len(value) != num_queries:
        raise ValueError(f"{name} must have one entry per query ({num_queries}), got {len(value)}.")
    result = []
    for items in value:
        items = index_vector(list(items) if not isinstance(items, torch.Tensor) else items, name)
        if items.numel() and (items.min() < 0 or items.max() >= num_items):
            raise ValueError(f"{name} holds item indices outside [0, {num_items}).")
        result.append(items)
    return result


def _lists_from_ids(value: Mapping, num_queries: int, query_ids: Any, item_ids: Any, name: str) -> list[list[int]]:
    if query_ids is None or item_ids is None:
        raise ValueError(
            f"{name} is a mapping of ids; pass image_ids and text_ids (one id per image / caption) to "
            "resolve them, or give a list with one sequence of item indices per query."
        )
    query_index = {key: i for i, key in enumerate(query_ids)}
    item_index = {key: i for i, key in enumerate(item_ids)}
    lists: list[list[int]] = [[] for _ in range(num_queries)]
    for query, items in value.items():
        if query not in query_index:
            raise ValueError(f"{name}: query id {query!r} is not among the given ids.")
        missing = [item for item in items if item not in item_index]
        if missing:
            raise ValueError(f"{name}: item ids {missing[:5]} of query {query!r} are not among the given ids.")
        lists[query_index[query]] = [item_index[item] for item in items]
    return lists


def unranked_counts(unranked_positives: Any, direction: str, num_queries: int) -> torch.Tensor | None:
    """Per query (caller's order), the positives that are not among the ranked items, or ``None``."""
    if unranked_positives is None or direction not in unranked_positives:
        return None
    counts = index_vector(unranked_positives[direction], f"unranked_positives[{direction!r}]", num_queries)
    if counts.numel() and int(counts.min()) < 0:
        raise ValueError(f"unranked_positives[{direction!r}] holds negative counts.")
    return counts


def is_direction_dict(positives: Any) -> bool:
    """Whether ``positives`` is ``{"i2t": ..., "t2i": ...}`` (one or both directions)."""
    return isinstance(positives, Mapping) and set(positives) <= set(DIRECTIONS)


def build_positives(
    positives: Any,
    layout: Layout,
    image_classes: torch.Tensor | None,
    image_ids: Any,
    text_ids: Any,
    unranked_positives: Any = None,
) -> dict[str, Any]:
    """Direction -> ``"pairs"`` | ``"classes"`` | :class:`ExplicitPositives`."""
    if unranked_positives is not None and not is_direction_dict(positives):
        raise ValueError("unranked_positives needs positives as a dict {'i2t': ..., 't2i': ...}.")
    if positives is None:
        positives = "classes" if image_classes is not None else "pairs"
    if isinstance(positives, str):
        if positives not in ("pairs", "classes"):
            raise ValueError(f"positives must be 'pairs', 'classes', a bool matrix or a dict, got {positives!r}.")
        if positives == "classes" and image_classes is None:
            raise ValueError("positives='classes' needs image_classes.")
        return {direction: positives for direction in DIRECTIONS}
    if is_direction_dict(positives):
        return {
            direction: (
                _direction_positives(positives[direction], direction, layout, image_ids, text_ids, unranked_positives)
                if direction in positives
                else "pairs"
            )
            for direction in DIRECTIONS
        }
    return _matrix_positives(positives, layout)


def _direction_positives(value, direction, layout: Layout, image_ids, text_ids, unranked_positives):
    """The explicit positives of one direction, given per query in the caller's order."""
    num_images, num_texts = layout.num_images, layout.num_texts
    sorted_position = layout.caller_positions()
    if direction == "i2t":
        lists = positives_from_lists(value, num_images, num_texts, image_ids, text_ids, "positives['i2t']")
        queries = torch.cat([torch.full((len(items),), q, dtype=torch.long) for q, items in enumerate(lists)])
        items = sorted_position[torch.cat(lists)] if lists else torch.empty(0, dtype=torch.long)
        unranked = unranked_counts(unranked_positives, direction, num_images)
        return ExplicitPositives(queries * num_texts + items, num_texts, unranked)
    lists = positives_from_lists(value, num_texts, num_images, text_ids, image_ids, "positives['t2i']")
    queries = torch.cat(
        [torch.full((len(items),), int(sorted_position[q]), dtype=torch.long) for q, items in enumerate(lists)]
    )
    items = torch.cat(lists) if lists else torch.empty(0, dtype=torch.long)
    unranked = unranked_counts(unranked_positives, direction, num_texts)
    if unranked is not None:  # caller's caption order -> internal order
        unranked = torch.zeros_like(unranked).index_copy_(0, sorted_position, unranked)
    return ExplicitPositives(queries * num_images + items, num_images, unranked)


def _matrix_positives(positives: Any, layout: Layout) -> dict[str, ExplicitPositives]:
    num_images, num_texts = layout.num_images, layout.num_texts
    matrix = as_tensor(positives, "positives")
    if matrix.shape != (num_images, num_texts):
        raise ValueError(
            f"positives as a matrix must be (num_images, num_texts) = ({num_images}, {num_texts}), "
            f"got {tuple(matrix.shape)}; or pass a dict {{'i2t': [...], 't2i': [...]}} of per-query index lists."
        )
    image_index, text_index = matrix.bool().nonzero(as_tuple=True)
    text_index = layout.caller_positions()[text_index]
    return {
        "i2t": ExplicitPositives(image_index * num_texts + text_index, num_texts),
        "t2i": ExplicitPositives(text_index * num_images + image_index, num_images),
    }
