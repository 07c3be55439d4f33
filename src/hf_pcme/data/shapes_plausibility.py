"""Exact plausibility of shapes captions for images, for all pairs: vectorised and in chunks.

:func:`~hf_pcme.data.shapes_grammar.is_plausible` is the reference definition this computes.
Also reads the specs back from a shapes dataset's columns. Part of :mod:`hf_pcme.data.shapes`
(which re-exports every public name here).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import datasets
import numpy as np

from hf_pcme.data.shapes_grammar import (
    COLOURS,
    KINDS,
    MAX_SHAPES,
    POSITIONS,
    SIZES,
    UNSPECIFIED,
    VALUES,
    CaptionSpec,
    ImageSpec,
    Phrase,
    Shape,
)

_NUM_CODES = len(KINDS) * len(COLOURS) * len(SIZES) * len(POSITIONS)
_EMPTY_SLOT = _NUM_CODES  # code of a missing shape (images with fewer than MAX_SHAPES shapes)
_PERMUTATIONS = tuple(itertools.permutations(range(MAX_SHAPES)))


def _code(shape: Sequence[int]) -> int:
    kind, colour, size, position = shape
    return ((kind * len(COLOURS) + colour) * len(SIZES) + size) * len(POSITIONS) + position


# Attributes of every shape code, (num_codes, 4): the phrase masks below are comparisons with it.
_CODE_ATTRIBUTES = np.array(list(itertools.product(*(range(len(v)) for v in VALUES))), dtype=np.int64)
assert all(_code(attrs) == i for i, attrs in enumerate(_CODE_ATTRIBUTES))


def encode_images(images: Sequence[Sequence[Sequence[int]]]) -> tuple[np.ndarray, np.ndarray]:
    """(codes (N, MAX_SHAPES) int64, padded with an empty-slot code; counts (N,) int64)."""
    codes = np.full((len(images), MAX_SHAPES), _EMPTY_SLOT, dtype=np.int64)
    counts = np.zeros(len(images), dtype=np.int64)
    for row, shapes in enumerate(images):
        if not 1 <= len(shapes) <= MAX_SHAPES:
            raise ValueError(f"Image {row} has {len(shapes)} shapes; shapes images have 1..{MAX_SHAPES}.")
        counts[row] = len(shapes)
        codes[row, : len(shapes)] = [_code(shape) for shape in shapes]
    return codes, counts


def encode_captions(captions: Sequence[CaptionSpec]) -> tuple[np.ndarray, np.ndarray]:
    """(masks (M, MAX_SHAPES, num_codes + 1) bool, required counts (M,) int64, -1 = any).

    ``masks[m, i, c]``: shape code ``c`` satisfies phrase ``i`` of caption ``m``. Unused phrase
    slots accept everything (including the empty slot), so a caption with fewer phrases than the
    image has shapes needs no special case.
    """
    masks = np.ones((len(captions), MAX_SHAPES, _NUM_CODES + 1), dtype=bool)
    required = np.full(len(captions), -1, dtype=np.int64)
    for row, caption in enumerate(captions):
        if len(caption.phrases) > MAX_SHAPES:
            raise ValueError(f"Caption {row} has {len(caption.phrases)} phrases; at most {MAX_SHAPES} are supported.")
        for slot, phrase in enumerate(caption.phrases):
            mask = np.ones(_NUM_CODES, dtype=bool)
            for column, value in enumerate(phrase):
                if value is not None:
                    mask &= _CODE_ATTRIBUTES[:, column] == value
            masks[row, slot, :_NUM_CODES] = mask
            masks[row, slot, _EMPTY_SLOT] = False
        if caption.exhaustive:
            required[row] = len(caption.phrases)
    return masks, required


def _plausible_block(codes: np.ndarray, counts: np.ndarray, masks: np.ndarray, required: np.ndarray) -> np.ndarray:
    """(len(codes), len(masks)) bool: some permutation maps every phrase slot to a satisfying slot."""
    satisfied = masks[:, :, codes]  # (captions, phrase slot, images, shape slot)
    plausible = np.zeros((len(masks), len(codes)), dtype=bool)
    for permutation in _PERMUTATIONS:
        assignment = satisfied[:, 0, :, permutation[0]]
        for slot in range(1, MAX_SHAPES):
            assignment = assignment & satisfied[:, slot, :, permutation[slot]]
        plausible |= assignment
    plausible &= (required[:, None] < 0) | (required[:, None] == counts[None, :])
    return plausible.T


class ShapesPlausibility:
    """Exact plausibility of (image, caption) pairs, computed in chunks from encoded specs."""

    def __init__(self, images: Sequence[Sequence[Shape]], captions: Sequence[CaptionSpec]) -> None:
        self.image_codes, self.image_counts = encode_images(images)
        self.caption_masks, self.caption_required = encode_captions(captions)

    @classmethod
    def from_datasets(cls, images: datasets.Dataset, captions: datasets.Dataset) -> ShapesPlausibility:
        """From a shapes images dataset (``shapes`` column) and captions dataset (``phrases``, ``exhaustive``)."""
        return cls(image_specs(images), caption_specs(captions))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.image_codes), len(self.caption_masks)

    def __call__(self, image_rows: np.ndarray | Sequence[int], caption_rows: np.ndarray | Sequence[int],
                 chunk_size: int = 1024) -> np.ndarray:
        """(len(image_rows), len(caption_rows)) bool block of the plausibility matrix."""
        image_rows = np.asarray(image_rows, dtype=np.int64)
        caption_rows = np.asarray(caption_rows, dtype=np.int64)
        out = np.zeros((len(image_rows), len(caption_rows)), dtype=bool)
        for i in range(0, len(image_rows), chunk_size):
            rows = image_rows[i : i + chunk_size]
            for j in range(0, len(caption_rows), chunk_size):
                columns = caption_rows[j : j + chunk_size]
                out[i : i + chunk_size, j : j + chunk_size] = _plausible_block(
                    self.image_codes[rows], self.image_counts[rows],
                    self.caption_masks[columns], self.caption_required[columns],
                )
        return out

    def matrix(self, chunk_size: int = 1024) -> np.ndarray:
        num_images, num_captions = self.shape
        return self(np.arange(num_images), np.arange(num_captions), chunk_size=chunk_size)

    def plausible_images_per_caption(self, chunk_size: int = 1024) -> np.ndarray:
        """(num_captions,) int64: how many images each caption fits, the ground truth its
        uncertainty can be compared with; computed by caption chunks, never the whole matrix."""
        num_images, num_captions = self.shape
        counts = np.zeros(num_captions, dtype=np.int64)
        for start in range(0, num_captions, chunk_size):
            columns = np.arange(start, min(start + chunk_size, num_captions))
            counts[columns] = self(np.arange(num_images), columns, chunk_size=chunk_size).sum(axis=0)
        return counts


def plausibility_matrix(
    captions: Sequence[CaptionSpec], images: Sequence[Sequence[Shape]], chunk_size: int = 1024
) -> np.ndarray:
    """(num_images, num_captions) bool: ``[i, j] = is_plausible(captions[j], images[i])``, chunked."""
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be positive; got {chunk_size}.")
    return ShapesPlausibility(images, captions).matrix(chunk_size)


def image_specs(dataset: datasets.Dataset) -> list[ImageSpec]:
    """The ``shapes`` column of a shapes dataset as a list of :class:`Shape` tuples."""
    return [tuple(Shape(*shape) for shape in row) for row in dataset.select_columns(["shapes"])[:]["shapes"]]


def caption_specs(dataset: datasets.Dataset) -> list[CaptionSpec]:
    """The ``phrases`` / ``exhaustive`` columns of a shapes dataset as :class:`CaptionSpec` objects."""
    table = dataset.select_columns(["phrases", "exhaustive"])[:]  # one batch, not row by row
    return [
        CaptionSpec(tuple(Phrase(*(None if v == UNSPECIFIED else v for v in p)) for p in phrases), bool(exhaustive))
        for phrases, exhaustive in zip(table["phrases"], table["exhaustive"])
    ]
