"""The embedded "shapes" dataset: generated images of 1-3 shapes, captions of graded specificity,
and exact plausible-match labels.

Each image (``image_size`` pixels square, 64 by default) is a 2 x 2 grid; 1-3 of its cells hold
one shape each, with a kind (circle, square, triangle), a colour (red, green, blue, yellow), a size
(small, large) and a position (the cell: top left, top right, bottom left, bottom right). Positions
are therefore unambiguous, and no two shapes share one.

Captions come at five specificity levels (``specificity``; caption ``k`` of an image has level
``k % 5``)::

    0  every shape, every attribute, and the count
           "two shapes: a small red circle at the top left and a large blue square at the bottom right"
    1  every shape and the count, no positions
           "two shapes: a small red circle and a large blue square"
    2  some shapes, kind and colour           "a red circle and a blue square"
    3  one shape, one attribute               "a red shape", "a circle", "a large shape", "a shape at the top left"
    4  nothing                                "some shapes"

Semantics (exact plausibility). A caption is a list of phrases plus an ``exhaustive`` flag (the
count prefix "one shape:" / "two shapes:" / "three shapes:"). A phrase fixes some attributes and
leaves the others open ("a red shape" fixes only the colour). A caption is plausible for an image
iff every statement in it is true of the image:

* there is a one-to-one assignment of the phrases to distinct shapes of the image such that each
  shape has every attribute its phrase fixes ("a red shape and a circle" needs two shapes), and
* if the caption is exhaustive, the image has exactly as many shapes as the caption has phrases.

"some shapes" (no phrase) is plausible for every image; an exact caption only for images with the
same shapes (pixels aside). :func:`is_plausible` is the reference definition;
:func:`plausibility_matrix` computes it for all pairs, vectorised and in chunks.

Everything is deterministic by ``seed``: image ``i`` of a split draws from
``numpy.random.default_rng([seed, split_number, i])``, so it does not depend on how many images
are generated, and the same seed gives identical pixels and captions.

Augmentation: a horizontal flip swaps left and right, and a random crop can cut a shape out or move
it across the grid, making position, size and count statements false. Train shapes with the eval
transform (no geometric augmentation); the generator gives fresh images instead.

Code: :mod:`~hf_pcme.data.shapes_grammar` (shapes, captions, semantics, text),
:mod:`~hf_pcme.data.shapes_plausibility` (all pairs at once), :mod:`~hf_pcme.data.shapes_render`
(drawing and describing); this module holds the ``datasets`` builder and re-exports their public names.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets

from hf_pcme.data import shapes_grammar, shapes_plausibility, shapes_render
from hf_pcme.data._common import ArrowBatcher, build_with_cache, code_hash
from hf_pcme.data.shapes_grammar import (
    ATTRIBUTES,
    COLOURS,
    COUNT_WORDS,
    IMAGE_ID_STRIDE,
    KINDS,
    MAX_SHAPES,
    NUM_LEVELS,
    POSITIONS,
    SIZES,
    SPLIT_NUMBERS,
    UNSPECIFIED,
    VALUES,
    CaptionSpec,
    ImageSpec,
    Phrase,
    Shape,
    caption_text,
    is_plausible,
    parse_caption,
)
from hf_pcme.data.shapes_plausibility import (
    ShapesPlausibility,
    caption_specs,
    encode_captions,
    encode_images,
    image_specs,
    plausibility_matrix,
)
from hf_pcme.data.shapes_render import (
    ShapesExample,
    describe,
    draw_scene,
    generate_example,
    render_image,
    sample_image_spec,
)
from hf_pcme.registry import check_choice

#: The source files whose code decides the rows: any edit to them invalidates the Arrow cache.
SOURCE_FILES = (__file__, shapes_grammar.__file__, shapes_plausibility.__file__, shapes_render.__file__)


def _phrase_row(phrase: Phrase) -> list[int]:
    return [UNSPECIFIED if value is None else value for value in phrase]


def shapes_features() -> datasets.Features:
    spec = datasets.List(datasets.List(datasets.Value("int8"), length=len(ATTRIBUTES)))
    return datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "caption": datasets.Value("string"),
            "caption_id": datasets.Value("int64"),
            "specificity": datasets.Value("int8"),
            "shapes": spec,  # (num_shapes, 4): kind, colour, size, position
            "num_shapes": datasets.Value("int8"),
            "phrases": spec,  # (num_phrases, 4), -1 = attribute left open
            "exhaustive": datasets.Value("bool"),
        }
    )


@dataclass
class ShapesConfig(datasets.BuilderConfig):
    num_train_images: int = 4000
    num_val_images: int = 500
    num_test_images: int = 500
    captions_per_image: int = NUM_LEVELS
    seed: int = 0
    image_size: int = 64


class Shapes(datasets.ArrowBasedBuilder):
    """``datasets`` builder for the generated shapes dataset (no input files)."""

    BUILDER_CONFIG_CLASS = ShapesConfig

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description="Generated images of 1-3 shapes with graded captions.",
                                    features=shapes_features())

    def _split_generators(self, dl_manager: Any) -> list[datasets.SplitGenerator]:
        sizes = {"train": self.config.num_train_images, "val": self.config.num_val_images,
                 "test": self.config.num_test_images}
        return [datasets.SplitGenerator(name=split, gen_kwargs={"split": split, "num_images": size})
                for split, size in sizes.items() if size > 0]

    def _generate_tables(self, split: str, num_images: int) -> Iterator[tuple[str, Any]]:
        config = self.config
        batcher = ArrowBatcher(self.info.features)
        for index in range(num_images):
            example = generate_example(config.seed, split, index, config.captions_per_image, config.image_size)
            buffer = io.BytesIO()
            example.image.save(buffer, format="PNG")
            png = buffer.getvalue()  # encoded once, shared by the image's caption rows
            image_id = SPLIT_NUMBERS[split] * IMAGE_ID_STRIDE + index
            shapes = [list(shape) for shape in example.shapes]
            for k, (caption, text) in enumerate(zip(example.captions, example.texts)):
                table = batcher.add(
                    {
                        "image": png,
                        "image_id": image_id,
                        "caption": text,
                        "caption_id": image_id * config.captions_per_image + k,
                        "specificity": k % NUM_LEVELS,
                        "shapes": shapes,
                        "num_shapes": len(shapes),
                        "phrases": [_phrase_row(p) for p in caption.phrases],
                        "exhaustive": caption.exhaustive,
                    }
                )
                if table is not None:
                    yield f"{split}-{index}-{k}", table
        table = batcher.flush()
        if table is not None:
            yield f"{split}-end", table


def load_shapes(
    num_images: int = 4000,
    *,
    num_eval_images: int = 500,
    captions_per_image: int = NUM_LEVELS,
    seed: int = 0,
    image_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    split: str | None = None,
) -> datasets.DatasetDict | datasets.Dataset:
    """Generate (first call) or memory-map (later calls) the shapes dataset.

    Args:
        num_images: training images (``train`` split).
        num_eval_images: images in each of ``val`` and ``test`` (0: no such splits).
        captions_per_image: captions per image; caption ``k`` has specificity ``k % 5``.
        seed: everything is a function of the seed (and of the image index).
        image_size: side of the square images in pixels (at least 16).
        cache_dir: where the Arrow cache lives (default: the ``datasets`` cache).
        split: return only this split.

    Returns:
        A ``DatasetDict`` (or one ``Dataset``) with one row per caption; see :func:`shapes_features`.
    """
    for name, value, low in (("num_images", num_images, 1), ("num_eval_images", num_eval_images, 0),
                             ("captions_per_image", captions_per_image, 1), ("image_size", image_size, 16)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"`{name}` must be an integer >= {low}; got {value!r}.")
    if split is not None:
        check_choice(split, SPLIT_NUMBERS if num_eval_images else ("train",), "split")
    builder = Shapes(
        cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        hash=code_hash(*SOURCE_FILES),
        num_train_images=num_images,
        num_val_images=num_eval_images,
        num_test_images=num_eval_images,
        captions_per_image=captions_per_image,
        seed=seed,
        image_size=image_size,
    )
    splits = build_with_cache(builder)
    return splits if split is None else splits[split]


__all__ = [
    "ATTRIBUTES",
    "COLOURS",
    "COUNT_WORDS",
    "IMAGE_ID_STRIDE",
    "KINDS",
    "MAX_SHAPES",
    "NUM_LEVELS",
    "POSITIONS",
    "SIZES",
    "SOURCE_FILES",
    "SPLIT_NUMBERS",
    "UNSPECIFIED",
    "VALUES",
    "CaptionSpec",
    "ImageSpec",
    "Phrase",
    "Shape",
    "Shapes",
    "ShapesConfig",
    "ShapesExample",
    "ShapesPlausibility",
    "caption_specs",
    "caption_text",
    "describe",
    "draw_scene",
    "encode_captions",
    "encode_images",
    "generate_example",
    "image_specs",
    "is_plausible",
    "load_shapes",
    "parse_caption",
    "plausibility_matrix",
    "render_image",
    "sample_image_spec",
    "shapes_features",
]
