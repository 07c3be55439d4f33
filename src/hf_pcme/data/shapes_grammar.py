"""The shapes grammar: shapes, captions as statements, their exact semantics and their English text.

Part of :mod:`hf_pcme.data.shapes` (its docstring describes the data set and the semantics; it
re-exports every public name here).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

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


def is_plausible(caption: CaptionSpec, image: Sequence[Shape]) -> bool:
    """True iff every statement of ``caption`` is true of ``image`` (see the module docstring)."""
    if caption.exhaustive and len(caption.phrases) != len(image):
        return False
    return any(
        all(phrase.matches(shape) for phrase, shape in zip(caption.phrases, shapes))
        for shapes in itertools.permutations(image, len(caption.phrases))
    )


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
