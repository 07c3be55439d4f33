"""The shapes generator in a web-like mode: each image comes with noisy tags instead of captions.

Stage 1 of the webly supervised recipe (``configs/shapes_webly.yaml``) trains on many such images,
as web images come with user tags; stage 2 on a small set of clean shapes captions.

Clean tags: one per shape, ``"<size> <colour> <kind>"`` (e.g. ``"small red circle"``); positions
and counts are not tagged. Noise, drawn per image from its own seeded generator:

* **dropped**: each tag is dropped with probability ``tag_drop_rate`` (if all would go, one
  chosen at random is kept, so no image has an empty text);
* **swapped**: each kept tag, with probability ``tag_swap_rate``, has one of its three words
  (uniformly chosen) replaced by a different value (``"small red circle"`` -> ``"small blue circle"``);
* **spurious**: with probability ``tag_spurious_rate`` one tag of a random shape (uniform
  attributes; it may happen to be true) is added.

The tags are then shuffled (web tags carry no order) and the text of the image is the tags
joined with ``", "`` in that order, one row per image. Pixels are those of :mod:`shapes` for the
same ``seed``, split and index; the noise comes from a separate generator, so changing a rate
never changes an image. Rows::

    image, image_id, caption (the joined tags), caption_id, tags (list of strings),
    clean_tags (list of strings: the tags before noise), shapes, num_shapes
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

from hf_pcme.data import shapes as shapes_module
from hf_pcme.data._caption_rows import DEFAULT_TAG_SEPARATOR
from hf_pcme.data._common import ArrowBatcher, build_with_cache, code_hash
from hf_pcme.data.shapes import (
    ATTRIBUTES,
    COLOURS,
    IMAGE_ID_STRIDE,
    KINDS,
    SIZES,
    SPLIT_NUMBERS,
    Shape,
    Shapes,
    ShapesConfig,
    draw_scene,
)
from hf_pcme.registry import check_choice

#: Words of a tag, in order, and their vocabularies.
TAG_WORDS = (SIZES, COLOURS, KINDS)
_NOISE_STREAM = 7  # appended to the image's seed: the noise generator is independent of the pixels


def shape_tag(size: int, colour: int, kind: int) -> str:
    return f"{SIZES[size]} {COLOURS[colour]} {KINDS[kind]}"


def clean_tags(shapes: Sequence[Shape]) -> list[str]:
    """One tag per shape, in the scene's order: ``"<size> <colour> <kind>"``."""
    return [shape_tag(s.size, s.colour, s.kind) for s in shapes]


def noisy_tags(shapes: Sequence[Shape], rng: np.random.Generator, drop_rate: float, swap_rate: float,
               spurious_rate: float) -> list[str]:
    """The web-like tags of a scene (see the module docstring for the noise model)."""
    words = [[s.size, s.colour, s.kind] for s in shapes]
    keep = rng.random(len(words)) >= drop_rate
    if not keep.any():
        keep[int(rng.integers(len(words)))] = True
    words = [w for w, k in zip(words, keep) if k]
    for tag in words:
        if rng.random() < swap_rate:
            slot = int(rng.integers(len(TAG_WORDS)))
            choices = [v for v in range(len(TAG_WORDS[slot])) if v != tag[slot]]
            tag[slot] = int(rng.choice(choices))
    if rng.random() < spurious_rate:
        words.append([int(rng.integers(len(vocabulary))) for vocabulary in TAG_WORDS])
    tags = [shape_tag(*w) for w in words]
    return [tags[i] for i in rng.permutation(len(tags))]


def shapes_web_features() -> datasets.Features:
    return datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "caption": datasets.Value("string"),
            "caption_id": datasets.Value("int64"),
            "tags": datasets.List(datasets.Value("string")),
            "clean_tags": datasets.List(datasets.Value("string")),
            "shapes": datasets.List(datasets.List(datasets.Value("int8"), length=len(ATTRIBUTES))),
            "num_shapes": datasets.Value("int8"),
        }
    )


@dataclass
class ShapesWebConfig(ShapesConfig):
    tag_drop_rate: float = 0.2
    tag_swap_rate: float = 0.2
    tag_spurious_rate: float = 0.3


class ShapesWeb(Shapes):
    """``datasets`` builder for shapes images with noisy tags (no input files); the splits of :class:`Shapes`."""

    BUILDER_CONFIG_CLASS = ShapesWebConfig

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description="Generated shapes images with web-like noisy tags.",
                                    features=shapes_web_features())

    def _generate_tables(self, split: str, num_images: int) -> Iterator[tuple[str, Any]]:
        config = self.config
        batcher = ArrowBatcher(self.info.features)
        for index in range(num_images):
            scene, image, _ = draw_scene(config.seed, split, index, config.image_size)  # shapes' own scene and pixels
            noise = np.random.default_rng([config.seed, SPLIT_NUMBERS[split], index, _NOISE_STREAM])
            tags = noisy_tags(scene, noise, config.tag_drop_rate, config.tag_swap_rate, config.tag_spurious_rate)
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            image_id = SPLIT_NUMBERS[split] * IMAGE_ID_STRIDE + index
            table = batcher.add(
                {
                    "image": buffer.getvalue(),
                    "image_id": image_id,
                    "caption": DEFAULT_TAG_SEPARATOR.join(tags),
                    "caption_id": image_id,
                    "tags": tags,
                    "clean_tags": clean_tags(scene),
                    "shapes": [list(shape) for shape in scene],
                    "num_shapes": len(scene),
                }
            )
            if table is not None:
                yield f"{split}-{index}", table
        table = batcher.flush()
        if table is not None:
            yield f"{split}-end", table


def load_shapes_web(
    num_images: int = 4000,
    *,
    num_eval_images: int = 0,
    seed: int = 0,
    image_size: int = 64,
    tag_drop_rate: float = 0.2,
    tag_swap_rate: float = 0.2,
    tag_spurious_rate: float = 0.3,
    cache_dir: str | os.PathLike | None = None,
    split: str | None = None,
) -> datasets.DatasetDict | datasets.Dataset:
    """Generate (first call) or memory-map (later calls) shapes images with noisy tags.

    Args:
        num_images: training images (``train`` split), one row each.
        num_eval_images: images in each of ``val`` and ``test`` (default 0: no such splits).
        seed: the same seed as :func:`~hf_pcme.data.load_shapes` gives the same pixels.
        image_size: side of the square images in pixels (at least 16).
        tag_drop_rate / tag_swap_rate / tag_spurious_rate: the noise (module docstring), each in [0, 1].
        cache_dir: where the Arrow cache lives (default: the ``datasets`` cache).
        split: return only this split.
    """
    for name, value, low in (("num_images", num_images, 1), ("num_eval_images", num_eval_images, 0),
                             ("image_size", image_size, 16)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}; got {value!r}.")
    for name, value in (("tag_drop_rate", tag_drop_rate), ("tag_swap_rate", tag_swap_rate),
                        ("tag_spurious_rate", tag_spurious_rate)):
        if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"`{name}` must be a probability in [0, 1]; got {value!r}.")
    if split is not None:
        check_choice(split, SPLIT_NUMBERS if num_eval_images else ("train",), "split")
    builder = ShapesWeb(
        cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        hash=code_hash(__file__, *shapes_module.SOURCE_FILES),
        num_train_images=num_images,
        num_val_images=num_eval_images,
        num_test_images=num_eval_images,
        seed=seed,
        image_size=image_size,
        tag_drop_rate=float(tag_drop_rate),
        tag_swap_rate=float(tag_swap_rate),
        tag_spurious_rate=float(tag_spurious_rate),
    )
    splits = build_with_cache(builder)
    return splits if split is None else splits[split]
