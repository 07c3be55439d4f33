"""Batch collation for image-caption retrieval: model inputs plus the ids that define positives.

``RetrievalCollator(processor)(rows)`` returns::

    pixel_values    (B, 3, H, W)  stacked from a transform's output, or computed here from "image"
    input_ids       (B, L)        captions tokenised and padded by the processor
    attention_mask  (B, L)
    image_ids       (B,) int64    positives of a pair = same image id (the trainer builds the mask
                                  over the gathered global batch: image_ids[:, None] == image_ids[None, :])
    caption_ids     (B,) int64
    labels          (B,) int64    class index, when rows have "label" (CUB)
    specificity     (B,) int64    shapes only: 0 = exact ... 4 = "some shapes"
    plausible_mask  (B, B) bool   shapes only: [i, j] = caption j is a plausible match for image i

Only ``pixel_values``, ``input_ids``, ``attention_mask`` and ``labels`` are model arguments; the
trainer pops the others before calling the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hf_pcme.data.transforms import pixel_values as processor_pixel_values

OPTIONAL_INT_COLUMNS = {"label": "labels", "specificity": "specificity"}


class RetrievalCollator:
    """Collate caption-level rows (optionally already transformed) into a model batch.

    Args:
        processor: callable as ``processor(images=..., return_tensors="pt")`` and
            ``processor(text=..., return_tensors="pt", padding=True, truncation=True)``
            (e.g. :class:`hf_pcme.PCMEProcessor`).
        image_column / text_column: where images and captions are in the rows.
        max_length: optional truncation length for the captions.
    """

    def __init__(self, processor: Any, *, image_column: str = "image", text_column: str = "caption",
                 max_length: int | None = None) -> None:
        self.processor = processor
        self.image_column = image_column
        self.text_column = text_column
        self.max_length = max_length

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("Cannot collate an empty batch.")
        first = rows[0]
        for column in ("image_id", "caption_id", self.text_column):
            if column not in first:
                raise ValueError(f"Rows need a {column!r} column; they have {sorted(first)}.")
        batch: dict[str, torch.Tensor] = {}
        if "pixel_values" in first:
            batch["pixel_values"] = torch.stack([torch.as_tensor(row["pixel_values"]) for row in rows])
        elif self.image_column in first:
            batch["pixel_values"] = processor_pixel_values(self.processor, [row[self.image_column] for row in rows])
        else:
            raise ValueError(
                f"Rows need 'pixel_values' (from a transform) or {self.image_column!r}; they have {sorted(first)}."
            )
        text_kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True, "truncation": True}
        if self.max_length is not None:
            text_kwargs["max_length"] = self.max_length
        encoded = self.processor(text=[row[self.text_column] for row in rows], **text_kwargs)
        batch["input_ids"] = encoded["input_ids"]
        batch["attention_mask"] = encoded["attention_mask"]
        batch["image_ids"] = torch.tensor([row["image_id"] for row in rows], dtype=torch.long)
        batch["caption_ids"] = torch.tensor([row["caption_id"] for row in rows], dtype=torch.long)
        for column, key in OPTIONAL_INT_COLUMNS.items():
            if column in first:
                batch[key] = torch.tensor([row[column] for row in rows], dtype=torch.long)
        if {"shapes", "phrases", "exhaustive"} <= first.keys():
            batch["plausible_mask"] = torch.from_numpy(_shapes_plausible_mask(rows))
        return batch


def _shapes_plausible_mask(rows: Sequence[dict[str, Any]]) -> Any:
    from hf_pcme.data.shapes import UNSPECIFIED, CaptionSpec, Phrase, Shape, ShapesPlausibility

    images = [tuple(Shape(*shape) for shape in row["shapes"]) for row in rows]
    captions = [
        CaptionSpec(tuple(Phrase(*(None if v == UNSPECIFIED else int(v) for v in p)) for p in row["phrases"]),
                    bool(row["exhaustive"]))
        for row in rows
    ]
    return ShapesPlausibility(images, captions).matrix()
