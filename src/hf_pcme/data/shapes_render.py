"""Drawing shapes images and describing them at a specificity level: the generator of the shapes data set.

Everything is a function of ``(seed, split, index)`` (see :func:`draw_scene`). Part of
:mod:`hf_pcme.data.shapes` (which re-exports every public name here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from hf_pcme.data.shapes_grammar import (
    ATTRIBUTES,
    COLOURS,
    KINDS,
    MAX_SHAPES,
    NUM_LEVELS,
    POSITIONS,
    SIZES,
    SPLIT_NUMBERS,
    CaptionSpec,
    ImageSpec,
    Phrase,
    Shape,
    caption_text,
)

_RGB = {"red": (220, 50, 47), "green": (60, 180, 75), "blue": (40, 100, 230), "yellow": (240, 210, 40)}


def sample_image_spec(rng: np.random.Generator) -> ImageSpec:
    """1-3 shapes in distinct grid cells, every attribute uniform."""
    count = int(rng.integers(1, MAX_SHAPES + 1))
    positions = rng.choice(len(POSITIONS), size=count, replace=False)
    return tuple(
        Shape(int(rng.integers(len(KINDS))), int(rng.integers(len(COLOURS))), int(rng.integers(len(SIZES))), int(p))
        for p in positions
    )


def render_image(shapes: Sequence[Shape], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw ``shapes`` on a dark background; small jitter in place and colour, never across cells."""
    background = int(rng.integers(10, 45))
    image = Image.new("RGB", (image_size, image_size), (background,) * 3)
    draw = ImageDraw.Draw(image)
    cell = image_size / 2
    for shape in shapes:
        row, column = divmod(shape.position, 2)
        radius = cell * (0.2 if SIZES[shape.size] == "small" else 0.36)
        jitter = rng.uniform(-0.1, 0.1, size=2) * cell  # radius + jitter stays inside the cell
        cx, cy = (column + 0.5) * cell + jitter[0], (row + 0.5) * cell + jitter[1]
        base = np.array(_RGB[COLOURS[shape.colour]])
        fill = tuple(int(v) for v in np.clip(base + rng.integers(-15, 16, size=3), 0, 255))
        kind = KINDS[shape.kind]
        if kind == "circle":
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=fill)
        elif kind == "square":
            half = radius * 0.85  # about the area of the circle
            draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
        else:
            draw.polygon(
                [(cx, cy - radius), (cx - radius * 0.95, cy + radius * 0.8), (cx + radius * 0.95, cy + radius * 0.8)],
                fill=fill,
            )
    return image


def describe(shapes: Sequence[Shape], level: int, rng: np.random.Generator) -> CaptionSpec:
    """A random caption of ``shapes`` at specificity ``level`` (0 = exact ... 4 = "some shapes")."""
    order = [shapes[i] for i in rng.permutation(len(shapes))]
    if level == 0:
        return CaptionSpec(tuple(Phrase(*shape) for shape in order), exhaustive=True)
    if level == 1:
        return CaptionSpec(tuple(Phrase(s.kind, s.colour, s.size) for s in order), exhaustive=True)
    if level == 2:
        count = int(rng.integers(1, len(order) + 1))
        return CaptionSpec(tuple(Phrase(s.kind, s.colour) for s in order[:count]))
    if level == 3:
        attribute = int(rng.integers(len(ATTRIBUTES)))
        values = [None] * len(ATTRIBUTES)
        values[attribute] = order[0][attribute]
        return CaptionSpec((Phrase(*values),))
    if level == 4:
        return CaptionSpec(())
    raise ValueError(f"`level` must be in 0..{NUM_LEVELS - 1}; got {level}.")


@dataclass
class ShapesExample:
    image: Image.Image
    shapes: ImageSpec
    captions: list[CaptionSpec]
    texts: list[str]


def draw_scene(seed: int, split: str, index: int, image_size: int = 64) -> tuple[ImageSpec, Image.Image, np.random.Generator]:
    """The shapes and pixels of image ``index`` of ``split``, and the generator the captions draw from next."""
    rng = np.random.default_rng([seed, SPLIT_NUMBERS[split], index])
    shapes = sample_image_spec(rng)
    return shapes, render_image(shapes, image_size, rng), rng


def generate_example(seed: int, split: str, index: int, captions_per_image: int = NUM_LEVELS,
                     image_size: int = 64) -> ShapesExample:
    """Image ``index`` of ``split``: the same arguments always give the same pixels and captions."""
    shapes, image, rng = draw_scene(seed, split, index, image_size)
    captions = [describe(shapes, k % NUM_LEVELS, rng) for k in range(captions_per_image)]
    return ShapesExample(image, shapes, captions, [caption_text(c) for c in captions])
