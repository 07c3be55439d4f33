"""The index inputs of the retrieval metrics, the caption order and the COCO 1K folds.

Captions are ranked sorted by image (stable sort), so the captions of one image, and of one fold,
are contiguous: a fold is a slice, and the plausibility levels of an image serve its captions as
one entry (see :mod:`hf_pcme.metrics.ranking`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .scorers import as_tensor

DIRECTIONS = ("i2t", "t2i")


def check_int_tuple(values: Sequence[int], name: str, minimum: int) -> tuple[int, ...]:
    """``values`` as a non-empty tuple of integers ``>= minimum`` (``ks``, ``zetas``)."""
    try:
        values = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of integers, got {values!r}.") from None
    if not values or any(v < minimum for v in values):
        raise ValueError(f"{name} must be a non-empty sequence of integers >= {minimum}, got {values}.")
    return values


def index_vector(value: Any, name: str, size: int | None = None) -> torch.Tensor:
    """A 1-D int64 tensor of indices (``size`` entries if given)."""
    vector = as_tensor(value, name)
    if vector.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(vector.shape)}.")
    if vector.is_floating_point() and not torch.equal(vector, vector.round()):
        raise ValueError(f"{name} must hold integer indices.")
    if size is not None and vector.numel() != size:
        raise ValueError(f"{name} must have {size} entries, got {vector.numel()}.")
    return vector.long()


def check_text_to_image(text_to_image: torch.Tensor, num_images: int, num_texts: int) -> None:
    """``text_to_image`` gives a valid image row to each of the ``num_texts`` captions."""
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


def check_fold_size(num_images: int, fold_size: int) -> None:
    """The 1K protocol needs folds that divide the images."""
    if fold_size < 1 or num_images % fold_size:
        raise ValueError(
            f"protocol='coco' splits the images into folds of fold_size={fold_size}, which must divide "
            f"the number of images ({num_images}); COCO 5K test: 5,000 images, fold_size=1000."
        )


class Layout:
    """Captions sorted by image (stable), and the image / caption ranges of the folds.

    Sorting makes the captions of one image, and of one fold, contiguous: fold views are slices.
    ``order[j]`` is the caller's index of sorted caption ``j`` (``None`` when already sorted).
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
        """Move the index tensors next to the score blocks."""
        for name in ("text_image", "captions_per_image", "caption_start"):
            setattr(self, name, getattr(self, name).to(device))
        if self.order is not None:
            self.order = self.order.to(device)

    def caption_range(self, first_image: int, end_image: int) -> tuple[int, int]:
        """Sorted-caption range of the images ``[first_image, end_image)``."""
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

    def caller_positions(self) -> torch.Tensor:
        """Sorted position of each caption of the caller (the inverse of ``order``)."""
        positions = torch.empty(self.num_texts, dtype=torch.long)
        order = self.order.cpu() if self.order is not None else torch.arange(self.num_texts)
        positions[order] = torch.arange(self.num_texts)
        return positions


def coco_folds(text_to_image: Any, num_images: int, fold_size: int = 1000) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The COCO 1K split: per fold, the image indices ``[f * fold_size, (f + 1) * fold_size)`` and the
    indices (into ``text_to_image``) of their captions, in caption order."""
    text_to_image = index_vector(text_to_image, "text_to_image")
    check_text_to_image(text_to_image, num_images, text_to_image.numel())
    check_fold_size(num_images, fold_size)
    folds = []
    for start in range(0, num_images, fold_size):
        images = torch.arange(start, start + fold_size)
        captions = ((text_to_image >= start) & (text_to_image < start + fold_size)).nonzero().flatten()
        folds.append((images, captions))
    return folds
