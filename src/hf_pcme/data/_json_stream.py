"""Stream the members of a large JSON object, item by item for its big arrays.

COCO annotation files are single JSON objects of 100-500 MB (``instances_train2014.json`` holds
every segmentation polygon). ``json.load`` keeps the whole decoded tree in memory, several times
the file size. We only need a few fields of each item, so we read the file in chunks and decode
one array item at a time with the C decoder (``json.JSONDecoder.raw_decode``); memory stays at a
few chunks plus what the caller keeps. No third-party parser (ijson) is needed.

Events are ``(key, value, is_item)``: for a top-level key listed in ``stream_keys`` whose value is
an array, one event per item (``is_item=True``); for every other key, one event with the whole
decoded value.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Iterator
from typing import Any

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_DEFAULT_CHUNK_CHARS = 1 << 20
# An error further than this from the end of the buffer cannot be caused by a value cut in two.
_INCOMPLETE_MARGIN = 4096
# No JSON number in these files is this long, so one ending further from the buffer end is whole.
_NUMBER_MARGIN = 64


class MalformedJSONError(ValueError):
    """A JSON file is not valid JSON, or not the object layout the caller expects."""


class _ChunkedText:
    """A sliding window over a text file: ``buffer[pos:]`` is what has not been consumed yet."""

    def __init__(self, path: str | os.PathLike, chunk_chars: int) -> None:
        self.path = os.fspath(path)
        self.file = open(self.path, encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.chunk_chars = chunk_chars
        self.buffer = ""
        self.pos = 0
        self.lines_dropped = 0
        self.eof = False

    def close(self) -> None:
        self.file.close()

    def fill(self, min_chars: int = 0) -> bool:
        """Append at least one chunk to the buffer (dropping the consumed prefix); False at EOF."""
        if self.eof:
            return False
        try:
            chunk = self.file.read(max(self.chunk_chars, min_chars))
        except UnicodeDecodeError as exc:
            raise MalformedJSONError(f"{self.path} is not UTF-8 text ({exc}).") from None
        if not chunk:
            self.eof = True
            return False
        if self.pos:
            self.lines_dropped += self.buffer.count("\n", 0, self.pos)
            self.buffer = self.buffer[self.pos :] + chunk
            self.pos = 0
        else:
            self.buffer += chunk
        return True

    def peek(self) -> str:
        """The next non-whitespace character ("" at the end of the file), not consumed."""
        while True:
            self.pos = _WHITESPACE.match(self.buffer, self.pos).end()
            if self.pos < len(self.buffer) or not self.fill():
                return self.buffer[self.pos : self.pos + 1]

    def expect(self, chars: str, what: str) -> str:
        char = self.peek()
        if not char or char not in chars:
            found = repr(char) if char else "the end of the file"
            raise self.error(f"expected {what} but found {found}", self.pos)
        self.pos += 1
        return char

    def value(self) -> Any:
        """Decode the JSON value starting at the next non-whitespace character."""
        self.peek()
        read_more = self.chunk_chars
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError as exc:
                near_end = len(self.buffer) - exc.pos < _INCOMPLETE_MARGIN
                incomplete = near_end or exc.msg.startswith("Unterminated string")
                # Grow the read geometrically so one huge value costs O(size), not O(size^2).
                if incomplete and self.fill(read_more):
                    read_more *= 2
                    continue
                raise self.error(exc.msg, exc.pos) from None
            # A number cut by the chunk end ("12|34", "-2.|25") decodes as a shorter number.
            cut_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if cut_number and len(self.buffer) - end < _NUMBER_MARGIN and self.fill(read_more):
                continue
            self.pos = end
            return value

    def error(self, message: str, at: int) -> MalformedJSONError:
        line = self.lines_dropped + self.buffer.count("\n", 0, at) + 1
        line_start = self.buffer.rfind("\n", 0, at) + 1
        return MalformedJSONError(
            f"Malformed JSON in {self.path} at line {line}, column {at - line_start + 1}: {message}."
        )


def iter_json_object(
    path: str | os.PathLike,
    stream_keys: Collection[str] = (),
    chunk_chars: int = _DEFAULT_CHUNK_CHARS,
) -> Iterator[tuple[str, Any, bool]]:
    """Yield the top-level members of the JSON object in ``path`` as ``(key, value, is_item)``.

    Arrays under ``stream_keys`` are yielded one item at a time (``is_item=True``); other members
    are yielded whole. Raises :class:`MalformedJSONError` (a ``ValueError``) naming the file, line
    and column when the text is not a JSON object.
    """
    reader = _ChunkedText(path, chunk_chars)
    try:
        reader.expect("{", "a JSON object ('{') at the start of the file")
        if reader.peek() == "}":
            reader.pos += 1
        else:
            while True:
                if reader.peek() != '"':
                    reader.expect('"', "a member name")
                key = reader.value()
                reader.expect(":", f"':' after the member name {key!r}")
                if key in stream_keys and reader.peek() == "[":
                    reader.pos += 1
                    if reader.peek() == "]":
                        reader.pos += 1
                    else:
                        while True:
                            yield key, reader.value(), True
                            if reader.expect(",]", f"',' or ']' in the array {key!r}") == "]":
                                break
                else:
                    yield key, reader.value(), False
                if reader.expect(",}", "',' or '}' after a member of the top-level object") == "}":
                    break
        if reader.peek():
            raise reader.error("unexpected text after the top-level object", reader.pos)
    finally:
        reader.close()


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """``json.load`` for a small file, with :class:`MalformedJSONError` naming the file on bad input."""
    return {key: value for key, value, _ in iter_json_object(path)}
