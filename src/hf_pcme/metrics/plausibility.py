"""Plausible matches of PMRP (Chun et al., "Probabilistic Embeddings for Cross-Modal Retrieval", CVPR 2021).

An item is *plausible* for a query at threshold zeta when the multi-hot instance labels of their
images differ in at most zeta positions (Hamming distance; a caption has its image's labels).
Items and queries whose image has no label are left out. Other sources: same class
(``image_classes``), or an explicit relation (``plausibility``: a bool matrix or a callable).

The ranking code sees *levels* (:class:`hf_pcme.metrics.ranking.PlausibilityLevels`):
``min(Hamming, max_zeta + 1)`` for a labelled item, ``max_zeta + 2`` for an unlabelled one.
"""

from __future__ import annotations

from typing import Any

import torch

from . import level_kernel
from .layout import Layout
from .rank_types import PlausibilityLevels
from .ranking import single_cpu_thread
from .scorers import as_tensor

#: Largest PMRP zeta: plausibility levels (up to zeta + 2) are stored as int8.
MAX_ZETA = 100


class Plausibility:
    """Plausibility levels of (query, item) pairs for PMRP, from one of three sources.

    Args:
        table_images: up to this many images, the levels of every image pair are computed once
            (int8 ``(N, N)``) and shared by both directions; beyond, per block.
    """

    def __init__(
        self, layout: Layout, zetas: tuple[int, ...], *, labels=None, classes=None, relation=None, table_images: int = 0
    ) -> None:
        self.layout = layout
        self.labels = labels
        self.classes = classes
        self.relation = relation
        self.table_images = table_images
        if labels is not None:
            self.zetas = zetas
            self.label_counts = labels.sum(1)
            self.labelled = self.label_counts > 0
        else:
            self.zetas = (0,)
            self.labelled = classes >= 0 if classes is not None else None
        self.max_zeta = max(self.zetas)
        self._table: torch.Tensor | None = None

    def image_table(self) -> torch.Tensor | None:
        """Levels of every image pair, int8 ``(N, N)``, computed once (``None`` past ``table_images``)."""
        if self._table is None and self.relation is None and self.layout.num_images <= self.table_images:
            if self.labels is not None and self.labels.device.type == "cpu" and level_kernel.available():
                self._table = level_kernel.levels_table(self.labels, self.labelled, self.max_zeta)
                return self._table
            num_images = self.layout.num_images
            table = torch.empty((num_images, num_images), dtype=torch.int8, device=self.labelled.device)
            with single_cpu_thread(table.device):  # element-wise passes: one thread (see ranking.py)
                for start in range(0, num_images, 256):
                    images = torch.arange(start, min(start + 256, num_images), device=table.device)
                    table[start : start + images.numel()] = self._image_levels(images, 0, num_images)
            self._table = table
        return self._table

    def _image_levels(self, query_images: torch.Tensor, first: int, end: int) -> torch.Tensor:
        """Levels of the images ``[first, end)`` for each query image, ``(q, end - first)``."""
        unlabelled = self.max_zeta + 2
        if self.labels is not None:
            # Hamming(a, b) = |a| + |b| - 2 a.b, exact in float32 for 0/1 labels; one product, in place
            items = self.labels[first:end]
            counts = self.label_counts[first:end].unsqueeze(0)
            levels = torch.addmm(counts, self.labels[query_images], items.t(), alpha=-2)
            levels.add_(self.label_counts[query_images].unsqueeze(1)).clamp_(max=self.max_zeta + 1)
        else:
            levels = (self.classes[query_images].unsqueeze(1) != self.classes[first:end].unsqueeze(0)).to(torch.int8)
        return levels.masked_fill_(~self.labelled[first:end].unsqueeze(0), unlabelled).to(torch.int8)

    def _relation_block(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """Plausibility of (images x captions), captions given in sorted order."""
        layout = self.layout
        original = layout.order[texts] if layout.order is not None else texts
        if callable(self.relation):
            block = as_tensor(self.relation(images, original), "plausibility(...)")
            if block.shape != (images.numel(), texts.numel()):
                raise ValueError(
                    f"plausibility(image_idx, text_idx) must return a ({images.numel()}, {texts.numel()}) bool block, "
                    f"got {tuple(block.shape)}."
                )
            return block.bool()
        return self.relation[images][:, original].bool()

    def levels(self, direction: str, queries: torch.Tensor, items: tuple[int, int]) -> PlausibilityLevels:
        """The levels of the items ``[first, end)`` for the query rows ``queries`` (internal order)."""
        if self.relation is not None:
            return self._relation_levels(direction, queries, items)
        if direction == "i2t":
            return self._i2t_levels(queries, items)
        layout = self.layout
        first, end = items
        query_images = layout.text_image[queries]
        table = self.image_table()
        if table is not None and (first, end) == (0, layout.num_images):
            return PlausibilityLevels(table, 1, self.max_zeta, self.labelled[query_images], row_index=query_images)
        unique, inverse = torch.unique(query_images, return_inverse=True)
        levels = self._image_levels(unique, first, end)
        return PlausibilityLevels(levels, 1, self.max_zeta, self.labelled[query_images], row_index=inverse)

    def _i2t_levels(self, queries: torch.Tensor, items: tuple[int, int]) -> PlausibilityLevels:
        # the captions of one image share its level: one entry per image when every image has as many captions
        layout = self.layout
        first, end = items
        images = layout.text_image[first:end]
        image_first, image_end = int(images[0]), int(images[-1]) + 1
        labelled = self.labelled[queries]
        table = self.image_table()
        whole = (image_first, image_end) == (0, layout.num_images)
        if layout.group_size is not None and table is not None and whole:
            return PlausibilityLevels(table, layout.group_size, self.max_zeta, labelled, row_index=queries)
        levels = self._image_levels(queries, image_first, image_end)
        if layout.group_size is not None:
            return PlausibilityLevels(levels, layout.group_size, self.max_zeta, labelled)
        return PlausibilityLevels(levels.index_select(1, images - image_first), 1, self.max_zeta, labelled)

    def _relation_levels(self, direction: str, queries: torch.Tensor, items: tuple[int, int]) -> PlausibilityLevels:
        first, end = items
        item_index = torch.arange(first, end, device=queries.device)
        if direction == "i2t":
            plausible = self._relation_block(queries, item_index)
        else:
            plausible = self._relation_block(item_index, queries).t()
        levels = (~plausible).to(torch.int32)
        everyone = torch.ones(queries.numel(), dtype=torch.bool, device=queries.device)
        return PlausibilityLevels(levels, 1, 0, everyone)


def build_plausibility(
    layout: Layout, zetas, image_labels, image_classes, plausibility, device: torch.device, table_images: int
) -> Plausibility | None:
    """The PMRP source of the call (labels, an explicit relation, or classes), or ``None`` (no PMRP)."""
    sources = (("image_labels", image_labels), ("plausibility", plausibility))
    given = [name for name, value in sources if value is not None]
    if len(given) > 1:
        raise ValueError(f"Give at most one source of plausible matches for PMRP, got {given}.")
    num_images, num_texts = layout.num_images, layout.num_texts
    if image_labels is not None:
        labels = as_tensor(image_labels, "image_labels")
        if labels.dim() != 2 or labels.shape[0] != num_images:
            raise ValueError(
                f"image_labels must be a (num_images, num_categories) = ({num_images}, C) multi-hot matrix, "
                f"got shape {tuple(labels.shape)}."
            )
        labels = labels.to(device=device, dtype=torch.float32)
        if not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError("image_labels must be multi-hot (0/1 values).")
        return Plausibility(layout, zetas, labels=labels, table_images=table_images)
    if plausibility is not None:
        if not callable(plausibility):
            plausibility = as_tensor(plausibility, "plausibility").to(device)
            if plausibility.shape != (num_images, num_texts):
                raise ValueError(
                    f"plausibility must be a (num_images, num_texts) = ({num_images}, {num_texts}) bool matrix or a "
                    f"callable(image_idx, text_idx) -> bool block, got shape {tuple(plausibility.shape)}."
                )
        return Plausibility(layout, zetas, relation=plausibility, table_images=table_images)
    if image_classes is not None:
        return Plausibility(layout, zetas, classes=image_classes, table_images=table_images)
    return None
