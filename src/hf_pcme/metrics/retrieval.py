"""Cross-modal retrieval metrics: Recall@K, RSUM, R-Precision, MAP@R and PMRP, both directions.

:func:`evaluate_retrieval` is the one entry point (trainer, scripts, the ``evaluate`` module). It
streams the score matrix in row blocks, once with the images as queries (i2t) and once with the
captions as queries (t2i), and computes every metric from each block in one pass
(:func:`hf_pcme.metrics.ranking.rank_block`), so the ``num_images x num_texts`` matrix is never
held in memory and no row is ever sorted.

Semantics (every value is a percentage, averaged over the queries that have at least one
relevant item):

- i2t: a query is an image; its *pairs* are its captions (``text_to_image == i``).
  t2i: a query is a caption; its pair is its image.
- Recall@K (K in ``ks``): 1 if a pair of the query is among the top K. ``rsum`` = the sum of
  the Recall@K of both directions.
- R-Precision and MAP@R (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020) against
  the *positives* of each query, ``R`` = number of positives:
  R-Precision = |top-R ∩ positives| / R, MAP@R = (1/R) sum_{i=1..R} P(i) rel(i).
  Positives are the pairs by default, the items of the same class when ``image_classes`` is
  given (PCME's CUB protocol), or explicit sets (e.g. ECCV Caption's human-verified positives).
  With positives other than the pairs, Recall@K against them is reported too
  (``i2t_positives_R@1``).
- PMRP (Chun et al., CVPR 2021): an item is plausible for a query if the multi-hot instance
  labels of their images differ in at most zeta positions (a caption has its image's labels).
  Items and queries whose image has no label are left out (from the ranking and from the
  queries). PMRP_zeta = |top-R ∩ plausible| / R with R = number of plausible items;
  ``*_pmrp`` is the mean over ``zetas``. With ``image_classes``, plausible = same class; with
  ``plausibility``, plausible = that matrix or function (e.g. the shapes data set).
- Ties: among items with equal scores, the items that are not relevant for the metric come
  first ("pessimistic"), for every metric; deterministic and independent of the item order.
- ``protocol="coco"``: also the 1K protocol, keys prefixed ``1k/``: the images in folds of
  ``fold_size`` (fold f = images ``[f * fold_size, (f + 1) * fold_size)`` and their captions),
  every metric computed inside each fold and averaged over the folds (PMRP included, as published;
  a fold where no query has a relevant item is left out of that metric's average).
  The unprefixed keys are always the whole set (5K for COCO); no ``5k/`` aliases are added.
- ``protocol="eccv_caption"`` / ``"cxc"``: the COCO keys plus ECCV Caption's mAP@R, R-Precision
  and R@1 and / or CxC's R@K, from the positives shipped by the ``eccv_caption`` package
  (:mod:`hf_pcme.metrics.eccv_caption`; needs ``image_ids`` / ``text_ids``).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .ranking import PlausibilityLevels, RelevanceView, Workspace, rank_block, single_cpu_thread
from .scorers import MatrixScores, ScoreSource, as_tensor, build_scorer

#: Scores per block produced by the scorer on GPU (128 MiB of float32): large enough for a fast matrix product.
BLOCK_ELEMENTS = 1 << 25
#: Scores per chunk on CPU (at most 64 MiB of float32 per worker): a product on one thread near the
#: BLAS peak (each product packs the whole item matrix, so chunks of fewer rows lose up to 10 %).
CPU_CHUNK_ELEMENTS = 1 << 24
#: Default worker threads on CPU (each holds one chunk).
MAX_CPU_WORKERS = 8
#: Scores per block given to the ranking passes (8 MiB of float32): stays in the CPU cache.
SUB_BLOCK_ELEMENTS = 1 << 21
#: Up to this many images, the PMRP levels of every image pair are computed once (int8, 64 MiB at most).
LEVEL_TABLE_IMAGES = 8192
#: Largest PMRP zeta: plausibility levels (up to zeta + 2) are stored as int8.
MAX_ZETA = 100
DIRECTIONS = ("i2t", "t2i")
PROTOCOLS = (None, "coco", "eccv_caption", "cxc")


# ---------------------------------------------------------------------------- inputs
def _check_int_tuple(values: Sequence[int], name: str, minimum: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of integers, got {values!r}.") from None
    if not values or any(v < minimum for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of integers >= {minimum}, got {values}.")
    return values


def _index_vector(value: Any, name: str, size: int | None = None) -> torch.Tensor:
    vector = as_tensor(value, name)
    if vector.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(vector.shape)}.")
    if vector.is_floating_point() and not torch.equal(vector, vector.round()):
        raise ValueError(f"{name} must hold integer indices.")
    if size is not None and vector.numel() != size:
        raise ValueError(f"{name} must have {size} entries, got {vector.numel()}.")
    return vector.long()


def _check_text_to_image(text_to_image: torch.Tensor, num_images: int, num_texts: int) -> None:
    if num_images == 0 or num_texts == 0:
        raise ValueError(
            f"Empty query set: {num_images} images and {num_texts} captions; retrieval metrics need both."
        )
    if text_to_image.numel() != num_texts:
        hint = "check that captions and scores/embeddings line up."
        if text_to_image.numel() == num_images:
            hint = (
                f"that is the number of images: scores look transposed, they must be (num_images, num_texts) = "
                f"({num_images}, {num_texts}) with images as rows; pass scores.T (or swap image_embeds and text_embeds)."
            )
        raise ValueError(
            f"text_to_image must give the image index of each of the {num_texts} captions, "
            f"got {text_to_image.numel()} entries; {hint}"
        )
    if text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise ValueError(
            f"text_to_image must hold image indices in [0, {num_images}), got values in "
            f"[{int(text_to_image.min())}, {int(text_to_image.max())}] (ids instead of row indices?)."
        )


# ---------------------------------------------------------------------------- the caption order
class _Layout:
    """Captions sorted by image (stable), and the image / caption ranges of the folds.

    Sorting makes the captions of one image, and of one fold, contiguous: fold views are slices.
    """

    def __init__(self, text_to_image: torch.Tensor, num_images: int, fold_size: int | None) -> None:
        self.num_images = num_images
        self.num_texts = text_to_image.numel()
        order = torch.sort(text_to_image, stable=True).indices
        self.order = None if torch.equal(order, torch.arange(self.num_texts)) else order
        self.text_image = text_to_image[order]  # the image of each caption, in sorted order
        self.captions_per_image = torch.bincount(text_to_image, minlength=num_images)
        missing = (self.captions_per_image == 0).nonzero().flatten()
        if missing.numel():
            raise ValueError(
                f"{missing.numel()} image(s) have no caption (e.g. rows {missing[:5].tolist()}); an image query "
                "without a caption has no answer. Drop those images or add their captions."
            )
        self.caption_start = torch.cumsum(self.captions_per_image, 0) - self.captions_per_image
        uniform = bool((self.captions_per_image == self.captions_per_image[0]).all())
        self.group_size = int(self.captions_per_image[0]) if uniform else None
        size = fold_size or num_images
        self.folds = [(start, min(start + size, num_images)) for start in range(0, num_images, size)]

    def to(self, device: torch.device) -> None:
        for name in ("text_image", "captions_per_image", "caption_start"):
            setattr(self, name, getattr(self, name).to(device))
        if self.order is not None:
            self.order = self.order.to(device)

    def caption_range(self, first_image: int, end_image: int) -> tuple[int, int]:
        start = int(self.caption_start[first_image])
        end = int(self.caption_start[end_image - 1] + self.captions_per_image[end_image - 1])
        return start, end

    def fold_ranges(self, direction: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """Per fold: (query range, item range) of a direction."""
        ranges = []
        for first, end in self.folds:
            images, captions = (first, end), self.caption_range(first, end)
            ranges.append((images, captions) if direction == "i2t" else (captions, images))
        return ranges


def coco_folds(text_to_image: Any, num_images: int, fold_size: int = 1000) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The COCO 1K split: per fold, the image indices ``[f * fold_size, (f + 1) * fold_size)`` and the
    indices (into ``text_to_image``) of their captions, in caption order."""
    text_to_image = _index_vector(text_to_image, "text_to_image")
    _check_text_to_image(text_to_image, num_images, text_to_image.numel())
    _check_fold_size(num_images, fold_size)
    folds = []
    for start in range(0, num_images, fold_size):
        images = torch.arange(start, start + fold_size)
        captions = ((text_to_image >= start) & (text_to_image < start + fold_size)).nonzero().flatten()
        folds.append((images, captions))
    return folds


def _check_fold_size(num_images: int, fold_size: int) -> None:
    if fold_size < 1 or num_images % fold_size:
        raise ValueError(
            f"protocol='coco' splits the images into folds of fold_size={fold_size}, which must divide "
            f"the number of images ({num_images}); COCO 5K test: 5,000 images, fold_size=1000."
        )


# ---------------------------------------------------------------------------- relevance
class _Positives:
    """Explicit positives of one direction as sorted keys ``query * num_items + item`` (internal order)."""

    def __init__(self, keys: torch.Tensor, num_items: int, unranked: torch.Tensor | None = None) -> None:
        self.keys = torch.unique(keys)
        self.num_items = num_items
        # per query (internal order): positives that are not among the ranked items; they count in R
        self.unranked = unranked

    def counts(self, queries: torch.Tensor, start: int, end: int) -> torch.Tensor:
        base = queries * self.num_items
        counts = torch.searchsorted(self.keys, base + end) - torch.searchsorted(self.keys, base + start)
        if self.unranked is not None and (start, end) == (0, self.num_items):
            counts = counts + self.unranked[queries]
        return counts

    def contains(self, queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        keys = queries * self.num_items + items
        where = torch.searchsorted(self.keys, keys).clamp_max(max(self.keys.numel() - 1, 0))
        if self.keys.numel() == 0:
            return torch.zeros_like(keys, dtype=torch.bool)
        return self.keys[where] == keys


def _positives_from_lists(
    value: Any, num_queries: int, num_items: int, query_ids: Any, item_ids: Any, name: str
) -> list[torch.Tensor]:
    """Per-query item indices from a list of index lists, or a mapping id -> ids."""
    if isinstance(value, Mapping):
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
        value = lists
    if len(value) != num_queries:
        raise ValueError(f"{name} must have one entry per query ({num_queries}), got {len(value)}.")
    result = []
    for items in value:
        items = _index_vector(list(items) if not isinstance(items, torch.Tensor) else items, name)
        if items.numel() and (items.min() < 0 or items.max() >= num_items):
            raise ValueError(f"{name} holds item indices outside [0, {num_items}).")
        result.append(items)
    return result


def _unranked_counts(unranked_positives: Any, direction: str, num_queries: int) -> torch.Tensor | None:
    if unranked_positives is None or direction not in unranked_positives:
        return None
    counts = _index_vector(unranked_positives[direction], f"unranked_positives[{direction!r}]", num_queries)
    if counts.numel() and int(counts.min()) < 0:
        raise ValueError(f"unranked_positives[{direction!r}] holds negative counts.")
    return counts


def _build_positives(
    positives: Any,
    layout: _Layout,
    image_classes: torch.Tensor | None,
    image_ids: Any,
    text_ids: Any,
    unranked_positives: Any = None,
) -> dict[str, Any]:
    """Direction -> "pairs" | "classes" | _Positives."""
    if positives is None:
        positives = "classes" if image_classes is not None else "pairs"
    if isinstance(positives, str):
        if positives not in ("pairs", "classes"):
            raise ValueError(f"positives must be 'pairs', 'classes', a bool matrix or a dict, got {positives!r}.")
        if positives == "classes" and image_classes is None:
            raise ValueError("positives='classes' needs image_classes.")
        return {direction: positives for direction in DIRECTIONS}
    num_images, num_texts = layout.num_images, layout.num_texts
    # position of each original caption in the sorted order
    rank_of_text = torch.empty(num_texts, dtype=torch.long)
    rank_of_text[layout.order if layout.order is not None else torch.arange(num_texts)] = torch.arange(num_texts)
    if isinstance(positives, Mapping) and set(positives) <= set(DIRECTIONS):
        result: dict[str, Any] = {}
        for direction in DIRECTIONS:
            if direction not in positives:
                result[direction] = "pairs"
                continue
            if direction == "i2t":
                lists = _positives_from_lists(
                    positives[direction], num_images, num_texts, image_ids, text_ids, "positives['i2t']"
                )
                queries = torch.cat([torch.full((len(items),), q, dtype=torch.long) for q, items in enumerate(lists)])
                items = rank_of_text[torch.cat(lists)] if lists else torch.empty(0, dtype=torch.long)
                unranked = _unranked_counts(unranked_positives, direction, num_images)
                result[direction] = _Positives(queries * num_texts + items, num_texts, unranked)
            else:
                lists = _positives_from_lists(
                    positives[direction], num_texts, num_images, text_ids, image_ids, "positives['t2i']"
                )
                queries = torch.cat(
                    [torch.full((len(items),), int(rank_of_text[q]), dtype=torch.long) for q, items in enumerate(lists)]
                )
                items = torch.cat(lists) if lists else torch.empty(0, dtype=torch.long)
                unranked = _unranked_counts(unranked_positives, direction, num_texts)
                if unranked is not None:  # caller's caption order -> internal order
                    unranked = torch.zeros_like(unranked).index_copy_(0, rank_of_text, unranked)
                result[direction] = _Positives(queries * num_images + items, num_images, unranked)
        return result
    matrix = as_tensor(positives, "positives")
    if matrix.shape != (num_images, num_texts):
        raise ValueError(
            f"positives as a matrix must be (num_images, num_texts) = ({num_images}, {num_texts}), "
            f"got {tuple(matrix.shape)}; or pass a dict {'i2t': [...], 't2i': [...]} of per-query index lists."
        )
    image_index, text_index = matrix.bool().nonzero(as_tuple=True)
    text_index = rank_of_text[text_index]
    return {
        "i2t": _Positives(image_index * num_texts + text_index, num_texts),
        "t2i": _Positives(text_index * num_images + image_index, num_images),
    }


# ---------------------------------------------------------------------------- plausibility (PMRP)
class _Plausibility:
    """Plausibility levels of (query, item) pairs for PMRP, from one of three sources."""

    def __init__(self, layout: _Layout, zetas: tuple[int, ...], *, labels=None, classes=None, relation=None) -> None:
        self.layout = layout
        self.labels = labels
        self.classes = classes
        self.relation = relation
        if labels is not None:
            self.zetas = zetas
            self.label_counts = labels.sum(1)
            self.labelled = self.label_counts > 0
        else:
            self.zetas = (0,)
            self.labelled = classes >= 0 if classes is not None else None
        self.max_zeta = max(self.zetas)
        self._table: torch.Tensor | None = None

    def _image_table(self) -> torch.Tensor | None:
        """Levels of every image pair, int8 ``(N, N)``, computed once and shared by both directions
        (only up to ``LEVEL_TABLE_IMAGES`` images; beyond, the levels are computed per block)."""
        if self._table is None and self.layout.num_images <= LEVEL_TABLE_IMAGES:
            num_images = self.layout.num_images
            table = torch.empty((num_images, num_images), dtype=torch.int8, device=self.labelled.device)
            for start in range(0, num_images, 1024):
                images = torch.arange(start, min(start + 1024, num_images), device=table.device)
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
        layout = self.layout
        first, end = items
        if self.relation is not None:
            item_index = torch.arange(first, end, device=queries.device)
            if direction == "i2t":
                plausible = self._relation_block(queries, item_index)
            else:
                plausible = self._relation_block(item_index, queries).t()
            levels = (~plausible).to(torch.int32)
            everyone = torch.ones(queries.numel(), dtype=torch.bool, device=queries.device)
            return PlausibilityLevels(levels, 1, 0, everyone)
        table = self._image_table()
        if direction == "i2t":
            images = layout.text_image[first:end]
            image_first, image_end = int(images[0]), int(images[-1]) + 1
            labelled = self.labelled[queries]
            whole = (image_first, image_end) == (0, layout.num_images)
            if layout.group_size is not None and table is not None and whole:
                return PlausibilityLevels(table, layout.group_size, self.max_zeta, labelled, row_index=queries)
            levels = self._image_levels(queries, image_first, image_end)
            if layout.group_size is not None:
                return PlausibilityLevels(levels, layout.group_size, self.max_zeta, labelled)
            return PlausibilityLevels(levels.index_select(1, images - image_first), 1, self.max_zeta, labelled)
        query_images = layout.text_image[queries]
        if table is not None and (first, end) == (0, layout.num_images):
            return PlausibilityLevels(table, 1, self.max_zeta, self.labelled[query_images], row_index=query_images)
        unique, inverse = torch.unique(query_images, return_inverse=True)
        levels = self._image_levels(unique, first, end)
        return PlausibilityLevels(levels, 1, self.max_zeta, self.labelled[query_images], row_index=inverse)


def _build_plausibility(
    layout: _Layout, zetas, image_labels, image_classes, plausibility, device: torch.device
) -> _Plausibility | None:
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
        return _Plausibility(layout, zetas, labels=labels)
    if plausibility is not None:
        if not callable(plausibility):
            plausibility = as_tensor(plausibility, "plausibility").to(device)
            if plausibility.shape != (num_images, num_texts):
                raise ValueError(
                    f"plausibility must be a (num_images, num_texts) = ({num_images}, {num_texts}) bool matrix or a "
                    f"callable(image_idx, text_idx) -> bool block, got shape {tuple(plausibility.shape)}."
                )
        return _Plausibility(layout, zetas, relation=plausibility)
    if image_classes is not None:
        return _Plausibility(layout, zetas, classes=image_classes)
    return None


# ---------------------------------------------------------------------------- relevance views
class _Relevance:
    """Builds the :class:`RelevanceView` of a block: pairs, classes or explicit positives."""

    def __init__(self, layout: _Layout, image_classes: torch.Tensor | None) -> None:
        self.layout = layout
        self.image_classes = image_classes
        self._class_counts: dict[tuple, torch.Tensor] = {}  # class histograms / classes per view
        self._images: torch.Tensor | None = None

    def _image_index(self) -> torch.Tensor:
        """The index of each image: the keys of the t2i items for the pairs."""
        if self._images is None:
            self._images = torch.arange(self.layout.num_images, device=self.layout.text_image.device)
        return self._images

    def _item_classes(self, direction: str, first: int, end: int) -> torch.Tensor:
        if direction == "i2t":
            return self.image_classes[self.layout.text_image[first:end]]
        return self.image_classes[first:end]

    def _query_classes(self, direction: str, queries: torch.Tensor) -> torch.Tensor:
        if direction == "i2t":
            return self.image_classes[queries]
        return self.image_classes[self.layout.text_image[queries]]

    def view(self, kind: Any, direction: str, queries: torch.Tensor, items: tuple[int, int]) -> RelevanceView:
        """Relevance of the items ``[first, end)`` (counts) for ``queries``; the test takes global item indices."""
        layout = self.layout
        first, end = items
        if kind == "pairs":
            if direction == "i2t":
                counts = layout.captions_per_image[queries]
                keys = (layout.text_image, queries)
                return RelevanceView(counts, lambda rows, cols: layout.text_image[cols] == queries[rows], keys)
            counts = torch.ones(queries.numel(), dtype=torch.long, device=queries.device)
            query_images = layout.text_image[queries]
            keys = (self._image_index(), query_images)
            return RelevanceView(counts, lambda rows, cols: cols == query_images[rows], keys)
        if kind == "classes":
            key = (direction, first, end)
            if key not in self._class_counts:
                item_classes = self._item_classes(direction, first, end)
                size = int(self.image_classes.max()) + 1 if self.image_classes.numel() else 1
                self._class_counts[key] = torch.bincount(item_classes[item_classes >= 0], minlength=max(size, 1))
            class_counts = self._class_counts[key]
            query_classes = self._query_classes(direction, queries)
            counts = torch.where(query_classes >= 0, class_counts[query_classes.clamp_min(0)], 0)
            key = (direction, "all")
            if key not in self._class_counts:
                num_items = layout.num_texts if direction == "i2t" else layout.num_images
                self._class_counts[key] = self._item_classes(direction, 0, num_items)
            all_classes = self._class_counts[key]
            # an unknown query class (-1) matches nothing, not even the items of unknown class
            keys = (all_classes, torch.where(query_classes >= 0, query_classes, -2))
            return RelevanceView(
                counts, lambda rows, cols: (all_classes[cols] == query_classes[rows]) & (query_classes[rows] >= 0), keys
            )
        counts = kind.counts(queries, first, end)
        return RelevanceView(counts, lambda rows, cols: kind.contains(queries[rows], cols))


# ---------------------------------------------------------------------------- accumulation
class _Means:
    """Sums and counts of per-query values, per (prefix, fold, metric name)."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, int, str], float] = defaultdict(float)
        self.counts: dict[tuple[str, int, str], int] = defaultdict(int)

    def add(self, prefix: str, fold: int, columns: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        """Add the per-query ``(name, values, valid)`` columns of one block (one masked sum for all)."""
        valid = torch.stack([column[2] for column in columns], 1)
        values = torch.stack([column[1].double() for column in columns], 1)
        sums = torch.where(valid, values, 0.0).sum(0).tolist()
        counts = valid.sum(0).tolist()
        for (name, _, _), total, count in zip(columns, sums, counts):
            self.sums[prefix, fold, name] += total
            self.counts[prefix, fold, name] += count

    def mean(self, prefix: str, name: str) -> float:
        """Mean over the queries (one fold), or mean over folds of the fold means (1K)."""
        folds = [fold for (p, fold, n) in self.counts if p == prefix and n == name and self.counts[p, fold, n] > 0]
        if not folds:
            raise ValueError(
                f"No query has a relevant item for {prefix}{name}: every query was skipped "
                "(no labelled query / no positive / empty query set). Check the labels or positives given."
            )
        return 100.0 * sum(self.sums[prefix, f, name] / self.counts[prefix, f, name] for f in folds) / len(folds)


# ---------------------------------------------------------------------------- entry point
def evaluate_retrieval(
    *,
    text_to_image: Any,
    scores: Any = None,
    image_embeds: Any = None,
    text_embeds: Any = None,
    image_log_sigma2: Any = None,
    text_log_sigma2: Any = None,
    image_samples: Any = None,
    text_samples: Any = None,
    scorer: str = "cosine",
    image_labels: Any = None,
    image_classes: Any = None,
    plausibility: Any = None,
    positives: Any = None,
    unranked_positives: Mapping[str, Any] | None = None,
    image_ids: Sequence[Any] | None = None,
    text_ids: Sequence[Any] | None = None,
    protocol: str | None = None,
    fold_size: int = 1000,
    zetas: Sequence[int] = (0, 1, 2),
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
    num_samples: int = 7,
    negative_scale: Any = None,
    shift: Any = None,
    seed: int = 0,
    num_workers: int | None = None,
    per_query: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """All retrieval metrics of a test set, both directions, in percent (see the module docstring).

    Args:
        text_to_image: ``(num_texts,)`` image index (row) of each caption.
        scores: ``(num_images, num_texts)`` scores, higher = better; or give embeddings.
        image_embeds, text_embeds: ``(N, D)`` means (``(N, K, D)`` for ``scorer="polysemous"``).
        image_log_sigma2, text_log_sigma2: ``(N, D)`` log variances (``"csd"``, ``"sampled"``).
        image_samples, text_samples: ``(N, J, D)`` samples for ``"sampled"`` (else drawn, ``num_samples``
            per item, seeded by ``seed``).
        scorer: ``"cosine"``, ``"csd"``, ``"sampled"`` or ``"polysemous"`` (``hf_pcme.metrics.SCORERS``).
        image_labels: ``(num_images, C)`` multi-hot instance labels -> PMRP per zeta in ``zetas``.
        image_classes: ``(num_images,)`` class ids (``-1`` = unknown) -> PMRP by class, and the
            default positives of R-Precision / MAP@R become the same-class items.
        plausibility: ``(num_images, num_texts)`` bool matrix, or ``callable(image_idx, text_idx)``
            returning that block (caption indices in the caller's order) -> PMRP.
        positives: ``"pairs"``, ``"classes"``, a ``(num_images, num_texts)`` bool matrix, or
            ``{"i2t": ..., "t2i": ...}`` with, per query, a sequence of item indices, or a mapping
            query id -> item ids resolved with ``image_ids`` / ``text_ids`` (a missing direction
            uses the pairs; queries without positives are skipped).
        unranked_positives: with a dict of ``positives``, ``{"i2t": ..., "t2i": ...}`` holding per
            query (caller's order) the number of further positives that are not among the ranked
            items: they count in ``R`` of R-Precision / MAP@R but are never retrieved (ECCV
            Caption's verified captions outside the 25K test captions, as ``eccv_caption`` counts them).
        protocol: ``None``, ``"coco"`` (adds the ``1k/`` keys), ``"eccv_caption"`` or ``"cxc"``
            (:func:`hf_pcme.metrics.eccv_caption.evaluate_eccv_caption`; other keywords go there).
        fold_size: images per fold of the 1K protocol (1000 for COCO).
        zetas: Hamming thresholds of PMRP.  ks: the K of Recall@K.
        chunk_size: query rows per score block (default: ~16M scores, 64 MiB, per chunk on CPU; ~32M on GPU).
        num_samples, negative_scale, shift, seed: for ``scorer="sampled"``.
        num_workers: threads that score and rank chunks of rows, each on one CPU thread (default:
            torch's thread count, at most 8, on CPU; 1 on GPU).
        per_query: a dict to fill with every query's values over the whole set (no ``1k/`` keys),
            the same names as the returned means (``i2t_R@1``, ``t2i_r_precision``,
            ``i2t_pmrp_zeta0``, ``t2i_pmrp`` = mean over ``zetas``, ...), each a float64 array of
            ``(num_images,)`` (i2t) or ``(num_texts,)`` (t2i) in the caller's order, as fractions
            in [0, 1] (not percent), NaN where the query is not scored (no relevant item). The mean
            of the non-NaN entries, times 100, is the returned value (PMRP: per zeta).

    Returns:
        A flat dict of floats in percent: ``i2t_R@1``, ..., ``rsum``, ``i2t_r_precision``,
        ``i2t_map_at_r``, ``i2t_pmrp``, ``i2t_pmrp_zeta0``, ... and with ``protocol="coco"`` the
        same names prefixed ``1k/``.
    """
    if protocol in ("eccv_caption", "cxc"):
        from .eccv_caption import evaluate_eccv_caption  # it calls back here with the positives

        if positives is not None or unranked_positives is not None:
            raise ValueError(f"protocol={protocol!r} brings its own positives; do not pass positives too.")

        return evaluate_eccv_caption(
            protocol=protocol, text_to_image=text_to_image, scores=scores, image_embeds=image_embeds,
            text_embeds=text_embeds, image_log_sigma2=image_log_sigma2, text_log_sigma2=text_log_sigma2,
            image_samples=image_samples, text_samples=text_samples, scorer=scorer, image_labels=image_labels,
            image_classes=image_classes, plausibility=plausibility, image_ids=image_ids, text_ids=text_ids,
            fold_size=fold_size, zetas=zetas, ks=ks, chunk_size=chunk_size, num_samples=num_samples,
            negative_scale=negative_scale, shift=shift, seed=seed, num_workers=num_workers,
        )  # fmt: skip
    ks = _check_int_tuple(ks, "ks", 1)
    zetas = _check_int_tuple(zetas, "zetas", 0)
    if max(zetas) > MAX_ZETA:
        raise ValueError(f"zetas are Hamming distances between label vectors, at most {MAX_ZETA} here; got {zetas}.")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}.")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1 query rows, got {chunk_size}.")

    source = _score_source(
        scores, scorer, image_embeds, text_embeds, image_log_sigma2, text_log_sigma2,
        image_samples, text_samples, num_samples, negative_scale, shift, seed,
    )  # fmt: skip
    num_images, num_texts = source.num_images, source.num_texts
    text_to_image = _index_vector(text_to_image, "text_to_image")
    _check_text_to_image(text_to_image, num_images, num_texts)
    if protocol == "coco":
        _check_fold_size(num_images, fold_size)
    if isinstance(scores, torch.Tensor) and scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or infinite values; replace masked scores by a finite very low value.")

    classes = None
    if image_classes is not None:
        classes = _index_vector(image_classes, "image_classes", num_images)
    layout = _Layout(text_to_image.cpu(), num_images, fold_size if protocol == "coco" else None)
    if layout.order is not None:
        source.reorder_texts(layout.order)
    device = source.device
    relevance_kinds = {"pairs": {d: "pairs" for d in DIRECTIONS}}
    if unranked_positives is not None and not (isinstance(positives, Mapping) and set(positives) <= set(DIRECTIONS)):
        raise ValueError("unranked_positives needs positives as a dict {'i2t': ..., 't2i': ...}.")
    positive_kinds = _build_positives(positives, layout, classes, image_ids, text_ids, unranked_positives)
    # everything indexed together with the score blocks lives on their device
    layout.to(device)
    if classes is not None:
        classes = classes.to(device)
    for kind in positive_kinds.values():
        if isinstance(kind, _Positives):
            kind.keys = kind.keys.to(device)
    if any(kind != "pairs" for kind in positive_kinds.values()):
        relevance_kinds["positives"] = positive_kinds
    plausible = _build_plausibility(layout, zetas, image_labels, classes, plausibility, device)

    prefixes = [""] + (["1k/"] if protocol == "coco" else [])
    relevance = _Relevance(layout, classes)
    means = _Means()
    local = threading.local()
    if num_workers is None:
        num_workers = min(MAX_CPU_WORKERS, torch.get_num_threads()) if device.type == "cpu" else 1
    # CPU: every task scores a chunk of query rows on one thread and ranks it at once, so the
    # chunks balance across the cores with no barrier between products and ranking (a preempted
    # core just takes fewer chunks) and the ranking reads scores still in cache.
    # GPU: one worker, large blocks for the matrix product.
    block_elements = CPU_CHUNK_ELEMENTS if device.type == "cpu" else BLOCK_ELEMENTS

    def rank_rows(block: torch.Tensor, block_start: int, rows: range, direction: str, fold_columns):
        everything = (0, block.shape[1])
        queries = torch.arange(rows.start, rows.stop, device=device)
        views = {name: relevance.view(kinds[direction], direction, queries, everything)
                 for name, kinds in relevance_kinds.items()}  # fmt: skip
        fold_views = None
        if fold_columns is not None:
            fold_views = {name: relevance.view(kinds[direction], direction, queries, fold_columns)
                          for name, kinds in relevance_kinds.items()}  # fmt: skip
        return rank_block(
            block[rows.start - block_start : rows.stop - block_start],
            ks=ks,
            relevance=views,
            plausibility=plausible.levels(direction, queries, everything) if plausible else None,
            zetas=plausible.zetas if plausible else (),
            fold_columns=fold_columns,
            fold_relevance=fold_views,
            workspace=local.workspace,
        )

    def score_and_rank(direction: str, rows: range, sub_rows: int, fold_columns) -> list:
        if not hasattr(local, "workspace"):
            local.workspace = Workspace()
        block = _rows(source, direction, slice(rows.start, rows.stop), local.workspace)
        pieces = [range(start, min(start + sub_rows, rows.stop)) for start in range(rows.start, rows.stop, sub_rows)]
        return [rank_rows(block, rows.start, piece, direction, fold_columns) for piece in pieces]

    tasks = []  # (direction, fold, rows, sub_rows, fold_columns), in a fixed order
    for direction in DIRECTIONS:
        num_items = num_texts if direction == "i2t" else num_images
        block_rows = int(chunk_size) if chunk_size else max(1, block_elements // num_items)
        sub_rows = max(1, SUB_BLOCK_ELEMENTS // num_items)
        if direction == "t2i" and layout.group_size and not chunk_size:
            # whole images per piece: their captions then share the plausibility rows (see ranking.py)
            block_rows = max(1, block_rows // layout.group_size) * layout.group_size
            sub_rows = max(1, sub_rows // layout.group_size) * layout.group_size
        for fold, (query_range, item_range) in enumerate(layout.fold_ranges(direction)):
            fold_columns = item_range if protocol == "coco" else None
            size = _even_chunk(query_range[1] - query_range[0], block_rows, layout.group_size if direction == "t2i" else 1)
            for start in range(query_range[0], query_range[1], size):
                rows = range(start, min(start + size, query_range[1]))
                tasks.append((direction, fold, rows, sub_rows, fold_columns))

    if plausible is not None and plausible.relation is None:
        plausible._image_table()  # shared by the workers: built once, before them
    # the workers run torch on one CPU thread each (see ranking.py)
    rows_of_query = {"i2t": None, "t2i": None if layout.order is None else layout.order.cpu().numpy()}
    sizes = {"i2t": num_images, "t2i": num_texts}
    with single_cpu_thread(device), ThreadPoolExecutor(max_workers=max(1, int(num_workers))) as pool:
        futures = [pool.submit(score_and_rank, direction, rows, sub_rows, fold_columns)
                   for direction, _, rows, sub_rows, fold_columns in tasks]  # fmt: skip
        for (direction, fold, rows, sub_rows, _), future in zip(tasks, futures):  # in order: sums independent of timing
            for piece_start, (ranks, fold_ranks) in zip(range(rows.start, rows.stop, sub_rows), future.result()):
                _accumulate(means, ranks, "", 0, direction, ks, plausible)
                if fold_ranks is not None:
                    _accumulate(means, fold_ranks, "1k/", fold, direction, ks, plausible)
                if per_query is not None:
                    _record_per_query(per_query, ranks, piece_start, direction, ks, plausible, sizes[direction],
                                      rows_of_query[direction])
    if per_query is not None and plausible is not None and plausible.labels is not None:
        for direction in DIRECTIONS:
            per_zeta = np.stack([per_query[f"{direction}_pmrp_zeta{z}"] for z in plausible.zetas])
            per_query[f"{direction}_pmrp"] = per_zeta.mean(0)  # NaN where a zeta does not score the query
    return _collect(means, prefixes, ks, relevance_kinds, plausible)


def _score_source(scores, scorer, image_embeds, text_embeds, image_log_sigma2, text_log_sigma2,
                  image_samples, text_samples, num_samples, negative_scale, shift, seed) -> ScoreSource:  # fmt: skip
    embeddings_given = any(v is not None for v in (image_embeds, text_embeds, image_samples, text_samples))
    if scores is not None and embeddings_given:
        raise ValueError("Give either scores or embeddings (image_embeds / text_embeds), not both.")
    if scores is not None:
        return MatrixScores(scores)
    if not embeddings_given:
        raise ValueError("Give scores (num_images, num_texts) or image_embeds and text_embeds with a scorer.")
    return build_scorer(
        scorer,
        image_embeds=image_embeds,
        text_embeds=text_embeds,
        image_log_sigma2=image_log_sigma2,
        text_log_sigma2=text_log_sigma2,
        image_samples=image_samples,
        text_samples=text_samples,
        num_samples=num_samples,
        negative_scale=negative_scale,
        shift=shift,
        seed=seed,
    )


def _even_chunk(num_rows: int, max_rows: int, multiple: int | None) -> int:
    """Rows per chunk: at most ``max_rows``, the same for every chunk of ``num_rows`` (no small last
    chunk, which would be a slow product), a multiple of ``multiple`` where possible."""
    chunks = -(-num_rows // max_rows)
    size = -(-num_rows // chunks)
    if multiple and multiple > 1 and max_rows % multiple == 0:
        size = -(-size // multiple) * multiple
    return max(1, size)


def _rows(source: ScoreSource, direction: str, rows: slice, workspace: Workspace) -> torch.Tensor:
    num_items = source.num_texts if direction == "i2t" else source.num_images
    shape = (rows.stop - rows.start, num_items)
    out = workspace.get("block", shape[0] * shape[1], torch.float32, source.device).view(shape)
    return source.image_rows(rows, out=out) if direction == "i2t" else source.text_rows(rows, out=out)


def _record_per_query(per_query: dict, ranks, piece_start: int, direction: str, ks, plausible, num_queries: int,
                      original_index) -> None:
    """Write one piece's per-query values (NaN = not scored) at the queries' positions in the caller's order."""
    for name, values, valid in _columns(ranks, direction, ks, plausible):
        if name not in per_query:
            per_query[name] = np.full(num_queries, np.nan)
        values = np.where(valid.cpu().numpy(), values.double().cpu().numpy(), np.nan)
        positions = np.arange(piece_start, piece_start + values.shape[0])
        per_query[name][positions if original_index is None else original_index[positions]] = values


def _accumulate(means: _Means, ranks, prefix: str, fold: int, direction: str, ks, plausible) -> None:
    means.add(prefix, fold, _columns(ranks, direction, ks, plausible))


def _columns(ranks, direction: str, ks, plausible) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The ``(metric name, per-query values, valid)`` columns of one ranked piece."""
    columns = []
    for name, hits in ranks.recall_hits.items():
        valid = ranks.valid[name]
        label = "" if name == "pairs" else "positives_"
        for column, k in enumerate(ks):
            columns.append((f"{direction}_{label}R@{k}", hits[:, column], valid))
        if name == "positives" or "positives" not in ranks.recall_hits:
            columns.append((f"{direction}_r_precision", ranks.r_precision[name], valid))
            columns.append((f"{direction}_map_at_r", ranks.ap_at_r[name], valid))
    if plausible is not None:
        for column, zeta in enumerate(plausible.zetas):
            name = f"{direction}_pmrp_zeta{zeta}" if plausible.labels is not None else f"{direction}_pmrp"
            columns.append((name, ranks.pmrp[:, column], ranks.pmrp_valid[:, column]))
    return columns


def _collect(means: _Means, prefixes, ks, relevance_kinds, plausible) -> dict[str, float]:
    results: dict[str, float] = {}
    for prefix in prefixes:
        for direction in DIRECTIONS:
            for k in ks:
                results[f"{prefix}{direction}_R@{k}"] = means.mean(prefix, f"{direction}_R@{k}")
        results[f"{prefix}rsum"] = sum(results[f"{prefix}{d}_R@{k}"] for d in DIRECTIONS for k in ks)
        for direction in DIRECTIONS:
            for name in ("r_precision", "map_at_r"):
                results[f"{prefix}{direction}_{name}"] = means.mean(prefix, f"{direction}_{name}")
            if "positives" in relevance_kinds:
                for k in ks:
                    results[f"{prefix}{direction}_positives_R@{k}"] = means.mean(prefix, f"{direction}_positives_R@{k}")
            if plausible is not None:
                if plausible.labels is not None:
                    per_zeta = [means.mean(prefix, f"{direction}_pmrp_zeta{z}") for z in plausible.zetas]
                    for zeta, value in zip(plausible.zetas, per_zeta):
                        results[f"{prefix}{direction}_pmrp_zeta{zeta}"] = value
                    results[f"{prefix}{direction}_pmrp"] = sum(per_zeta) / len(per_zeta)
                else:
                    results[f"{prefix}{direction}_pmrp"] = means.mean(prefix, f"{direction}_pmrp")
    return results
