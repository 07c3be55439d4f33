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
"""

from __future__ import annotations

import io
import itertools
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import datasets
import numpy as np
from PIL import Image, ImageDraw

from hf_pcme.data._common import ArrowBatcher, build_with_cache, code_hash
from hf_pcme.registry import check_choice

KINDS = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = ("kind", "colour", "size", "position")  # column order of the int8[4] specs
VALUES = (KINDS, COLOURS, SIZES, POSITIONS)
MAX_SHAPES = 3
NUM_LEVELS = 5
UNSPECIFIED = -1
COUNT_WORDS = ("one", "two", "three")
SPLIT_NUMBERS = {"train": 0, "val": 1, "test": 2}
IMAGE_ID_STRIDE = 1_000_000_000  # image_id = split_number * stride + index: unique across splits

_RGB = {"red": (220, 50, 47), "green": (60, 180, 75), "blue": (40, 100, 230), "yellow": (240, 210, 40)}
_NUM_CODES = len(KINDS) * len(COLOURS) * len(SIZES) * len(POSITIONS)
_EMPTY_SLOT = _NUM_CODES  # code of a missing shape (images with fewer than MAX_SHAPES shapes)
_PERMUTATIONS = tuple(itertools.permutations(range(MAX_SHAPES)))


class Shape(NamedTuple):
    """One drawn shape, as indices into KINDS, COLOURS, SIZES, POSITIONS."""

    kind: int
    colour: int
    size: int
    position: int


class Phrase(NamedTuple):
    """One noun phrase of a caption; ``None`` leaves an attribute open."""

    kind: int | None = None
    colour: int | None = None
    size: int | None = None
    position: int | None = None

    def matches(self, shape: Shape) -> bool:
        return all(want is None or want == have for want, have in zip(self, shape))


@dataclass(frozen=True)
class CaptionSpec:
    """A caption's statements: its phrases and whether it names every shape (count prefix)."""

    phrases: tuple[Phrase, ...]
    exhaustive: bool = False

    @property
    def specified_attributes(self) -> int:
        return sum(value is not None for phrase in self.phrases for value in phrase)


ImageSpec = tuple[Shape, ...]


# ---------------------------------------------------------------------------------------------
# Semantics
# ---------------------------------------------------------------------------------------------


def is_plausible(caption: CaptionSpec, image: Sequence[Shape]) -> bool:
    """True iff every statement of ``caption`` is true of ``image`` (see the module docstring)."""
    if caption.exhaustive and len(caption.phrases) != len(image):
        return False
    return any(
        all(phrase.matches(shape) for phrase, shape in zip(caption.phrases, shapes))
        for shapes in itertools.permutations(image, len(caption.phrases))
    )


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


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def _phrase_text(phrase: Phrase) -> str:
    words = ["a"]
    if phrase.size is not None:
        words.append(SIZES[phrase.size])
    if phrase.colour is not None:
        words.append(COLOURS[phrase.colour])
    words.append("shape" if phrase.kind is None else KINDS[phrase.kind])
    if phrase.position is not None:
        words.append(f"at the {POSITIONS[phrase.position]}")
    return " ".join(words)


def caption_text(caption: CaptionSpec) -> str:
    """The English caption of ``caption`` (inverse of :func:`parse_caption`)."""
    if not caption.phrases:
        if caption.exhaustive:
            raise ValueError("An exhaustive caption needs at least one phrase.")
        return "some shapes"
    phrases = [_phrase_text(phrase) for phrase in caption.phrases]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if caption.exhaustive:
        count = len(phrases)
        text = f"{COUNT_WORDS[count - 1]} shape{'s' if count > 1 else ''}: {text}"
    return text


_PHRASE = re.compile(
    rf"a(?: (?P<size>{'|'.join(SIZES)}))?(?: (?P<colour>{'|'.join(COLOURS)}))?"
    rf" (?P<kind>{'|'.join(KINDS)}|shape)(?: at the (?P<position>{'|'.join(POSITIONS)}))?"
)


def parse_caption(text: str) -> CaptionSpec:
    """Parse a caption of the shapes grammar (e.g. a user query) into its statements."""
    body = " ".join(text.lower().split())
    if body == "some shapes":
        return CaptionSpec(phrases=(), exhaustive=False)
    exhaustive = None
    prefix = re.match(r"(one|two|three) shapes?: ", body)
    if prefix:
        exhaustive = COUNT_WORDS.index(prefix.group(1)) + 1
        body = body[prefix.end() :]
    phrases = []
    for part in body.replace(", ", " and ").split(" and "):
        match = _PHRASE.fullmatch(part)
        if match is None:
            raise ValueError(f"Cannot parse {part!r} in the shapes caption {text!r}.")
        words = [match.group(name) for name in ATTRIBUTES]
        phrases.append(
            Phrase(*(None if word in (None, "shape") else values.index(word) for word, values in zip(words, VALUES)))
        )
    if exhaustive is not None and exhaustive != len(phrases):
        raise ValueError(f"The shapes caption {text!r} announces {exhaustive} shapes but describes {len(phrases)}.")
    if len(phrases) > MAX_SHAPES:
        raise ValueError(f"The shapes caption {text!r} describes more than {MAX_SHAPES} shapes.")
    return CaptionSpec(phrases=tuple(phrases), exhaustive=exhaustive is not None)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


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


def _phrase_row(phrase: Phrase) -> list[int]:
    return [UNSPECIFIED if value is None else value for value in phrase]


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
        hash=code_hash(__file__),
        num_train_images=num_images,
        num_val_images=num_eval_images,
        num_test_images=num_eval_images,
        captions_per_image=captions_per_image,
        seed=seed,
        image_size=image_size,
    )
    splits = build_with_cache(builder)
    return splits if split is None else splits[split]
