"""Which items are relevant for R-Precision / MAP@R / Recall@K: the pairs, the classes or explicit positives.

- pairs (Recall@K always; R-Precision and MAP@R by default): i2t, the captions of the query
  image (``text_to_image == i``); t2i, the caption's image;
- classes (``image_classes``, PCME's CUB protocol): the items whose image has the query's class;
- explicit positives (:mod:`hf_pcme.metrics.positives`).

A :class:`Relevance` turns one of these into the :class:`hf_pcme.metrics.ranking.RelevanceView`
of a block of query rows; pairs and classes are key equalities, which the compiled kernel ranks.
"""

from __future__ import annotations

from typing import Any

import torch

from .layout import Layout
from .rank_types import RelevanceView


class Relevance:
    """Builds the :class:`RelevanceView` of a block: pairs, classes or explicit positives."""

    def __init__(self, layout: Layout, image_classes: torch.Tensor | None) -> None:
        self.layout = layout
        self.image_classes = image_classes
        self._class_counts: dict[tuple, torch.Tensor] = {}  # class histograms / classes per view
        self._images: torch.Tensor | None = None

    def view(self, kind: Any, direction: str, queries: torch.Tensor, items: tuple[int, int]) -> RelevanceView:
        """Relevance of the items ``[first, end)`` (counts) for ``queries``; the test takes global item indices."""
        if kind == "pairs":
            return self._pairs(direction, queries)
        if kind == "classes":
            return self._classes(direction, queries, items)
        counts = kind.counts(queries, *items)
        return RelevanceView(counts, lambda rows, cols: kind.contains(queries[rows], cols))

    def _pairs(self, direction: str, queries: torch.Tensor) -> RelevanceView:
        layout = self.layout
        if direction == "i2t":
            counts = layout.captions_per_image[queries]
            keys = (layout.text_image, queries)
            return RelevanceView(counts, lambda rows, cols: layout.text_image[cols] == queries[rows], keys)
        counts = torch.ones(queries.numel(), dtype=torch.long, device=queries.device)
        query_images = layout.text_image[queries]
        if self._images is None:  # the index of each image: the keys of the t2i items
            self._images = torch.arange(layout.num_images, device=layout.text_image.device)
        keys = (self._images, query_images)
        return RelevanceView(counts, lambda rows, cols: cols == query_images[rows], keys)

    def _classes(self, direction: str, queries: torch.Tensor, items: tuple[int, int]) -> RelevanceView:
        first, end = items
        key = (direction, first, end)
        if key not in self._class_counts:
            item_classes = self._item_classes(direction, first, end)
            size = int(self.image_classes.max()) + 1 if self.image_classes.numel() else 1
            self._class_counts[key] = torch.bincount(item_classes[item_classes >= 0], minlength=max(size, 1))
        class_counts = self._class_counts[key]
        if direction == "i2t":
            query_classes = self.image_classes[queries]
        else:
            query_classes = self.image_classes[self.layout.text_image[queries]]
        counts = torch.where(query_classes >= 0, class_counts[query_classes.clamp_min(0)], 0)
        key = (direction, "all")
        if key not in self._class_counts:
            num_items = self.layout.num_texts if direction == "i2t" else self.layout.num_images
            self._class_counts[key] = self._item_classes(direction, 0, num_items)
        all_classes = self._class_counts[key]
        # an unknown query class (-1) matches nothing, not even the items of unknown class
        keys = (all_classes, torch.where(query_classes >= 0, query_classes, -2))
        return RelevanceView(
            counts, lambda rows, cols: (all_classes[cols] == query_classes[rows]) & (query_classes[rows] >= 0), keys
        )

    def _item_classes(self, direction: str, first: int, end: int) -> torch.Tensor:
        if direction == "i2t":
            return self.image_classes[self.layout.text_image[first:end]]
        return self.image_classes[first:end]
