"""Image transforms applied on the fly with ``Dataset.set_transform`` / ``with_transform``.

Training: random resized crop + horizontal flip (the PCME / VSE++ recipe), done in PIL, then the
processor's own resize and normalisation. Evaluation: the processor alone. Both convert images to
RGB first: a few COCO JPEGs are grayscale, and image processors reject one-channel input when the
normalisation mean has three entries.

A transform maps a batch (dict of lists, as ``datasets`` passes it) to the same batch with the
image column replaced by ``pixel_values`` (one (3, H, W) float tensor per row); the other columns
(caption, ids, labels) pass through, and :class:`hf_pcme.data.collate.RetrievalCollator` turns
them into model inputs. Randomness comes from ``torch``'s generator (or the one passed), which
``DataLoader`` seeds differently in each worker; a numpy generator captured in the closure would
give every worker the same crops.

Do not use the training transform on the shapes dataset: flips swap left and right and crops move
or cut shapes, which makes its captions false (see :mod:`hf_pcme.data.shapes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

Batch = dict[str, list[Any]]


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB mode (grayscale, palette, RGBA... are converted)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop covering ``scale`` of the area with aspect in ``ratio``.

    The sampling of torchvision's ``RandomResizedCrop``: area fraction uniform in ``scale``, log
    aspect ratio uniform in ``log(ratio)``; after ``attempts`` misses, the largest centred crop
    with an aspect ratio inside ``ratio``.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], generator))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = int(torch.randint(0, width - crop_width + 1, (), generator=generator))
            top = int(torch.randint(0, height - crop_height + 1, (), generator=generator))
            return left, top, left + crop_width, top + crop_height
    image_ratio = width / height
    if image_ratio < ratio[0]:
        crop_width, crop_height = width, round(width / ratio[0])
    elif image_ratio > ratio[1]:
        crop_width, crop_height = round(height * ratio[1]), height
    else:
        crop_width, crop_height = width, height
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return left, top, left + crop_width, top + crop_height


def augment(
    image: Image.Image,
    image_size: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> Image.Image:
    """Random resized crop to ``image_size`` x ``image_size`` and, with probability 1/2, a mirror."""
    image = to_rgb(image)
    box = random_resized_crop_box(image.width, image.height, scale, ratio, generator)
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)
    if flip and float(torch.rand((), generator=generator)) < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def processor_image_size(processor: Any) -> int:
    """The side length the processor's image processor outputs (crop size, else size)."""
    image_processor = getattr(processor, "image_processor", processor)
    for attribute in ("crop_size", "size"):
        size = getattr(image_processor, attribute, None)
        if isinstance(size, dict):
            size = dict(size)
        elif size is not None and not isinstance(size, int):
            size = {key: getattr(size, key, None) for key in ("height", "width", "shortest_edge")}
        if isinstance(size, int):
            return size
        if isinstance(size, dict):
            for key in ("height", "shortest_edge", "width"):
                if size.get(key):
                    return int(size[key])
    raise ValueError("Cannot read an image size from the processor; pass `image_size` explicitly.")


def pixel_values(processor: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    """(B, 3, H, W) from the processor's image part."""
    return processor(images=[to_rgb(image) for image in images], return_tensors="pt")["pixel_values"]


def _replace_images(batch: Batch, image_column: str, images: list[Image.Image], processor: Any) -> Batch:
    values = pixel_values(processor, images)
    out = {key: value for key, value in batch.items() if key != image_column}
    out["pixel_values"] = list(values)
    return out


def make_train_transform(
    processor: Any,
    image_size: int | None = None,
    *,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    image_column: str = "image",
    generator: torch.Generator | None = None,
) -> Callable[[Batch], Batch]:
    """Batch transform for training: augment in PIL, then the processor (see the module docstring).

    ``image_size`` defaults to the processor's output size, so its own resize is then a no-op.
    """
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"`scale` must satisfy 0 < low <= high <= 1; got {scale}.")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"`ratio` must satisfy 0 < low <= high; got {ratio}.")
    size = processor_image_size(processor) if image_size is None else image_size

    def transform(batch: Batch) -> Batch:
        images = [augment(image, size, scale, ratio, flip, generator) for image in batch[image_column]]
        return _replace_images(batch, image_column, images, processor)

    return transform


def make_eval_transform(processor: Any, *, image_column: str = "image") -> Callable[[Batch], Batch]:
    """Batch transform for evaluation (and for shapes training): RGB conversion + the processor."""

    def transform(batch: Batch) -> Batch:
        return _replace_images(batch, image_column, list(batch[image_column]), processor)

    return transform
