"""The first pass of :mod:`hf_pcme.data._caption_rows`: which columns hold what, and the plan of one split.

:class:`RowSpec` names the columns and the policies for bad rows; :func:`plan_split` checks every
source row of a split (image present and readable, captions not empty) and decides what is kept
and which image / caption ids it gets, before any Arrow is written.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import datasets
from PIL import Image, UnidentifiedImageError

from hf_pcme.data._common import MissingFileCounter, logger
from hf_pcme.registry import check_choice

EMPTY_CAPTION_POLICIES = ("error", "skip")
DEFAULT_TAG_SEPARATOR = ", "
SCAN_BATCH = 1000


@dataclass(frozen=True)
class RowSpec:
    """Which columns hold what, and the policies for bad rows (see the module docstring)."""

    image_column: str = "image"
    caption_column: str = "caption"
    id_column: str | None = None
    caption_id_column: str | None = None
    key_column: str | None = None
    tags: bool = False
    tag_separator: str = DEFAULT_TAG_SEPARATOR
    image_dir: str | None = None
    missing_images: str = "error"
    empty_captions: str = "error"
    verify_images: bool = True
    key_root: str | None = None  # image_key = the image path relative to this folder
    group_by_path: bool = False  # without id_column: rows naming the same image file are one image

    def check(self) -> None:
        check_choice(self.missing_images, ("error", "skip", "unchecked"), "missing_images")
        check_choice(self.empty_captions, EMPTY_CAPTION_POLICIES, "empty_captions")
        if not isinstance(self.tag_separator, str) or not self.tag_separator:
            raise ValueError(f"`tag_separator` must be a non-empty string; got {self.tag_separator!r}.")


def join_tags(value: Any, separator: str = DEFAULT_TAG_SEPARATOR) -> str:
    """``["dog", " beach", "dog", ""]`` -> ``"dog, beach"``: stripped, empty and repeated tags dropped, order kept.

    A string is read as comma-separated tags (``"dog, beach"``).
    """
    if value is None:
        return ""
    items = value.split(",") if isinstance(value, str) else list(value)
    kept: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"a tag must be a string, got {item!r}")
        tag = " ".join(item.split())
        if tag and tag not in kept:
            kept.append(tag)
    return separator.join(kept)


def _texts_of(value: Any, spec: RowSpec) -> list[str]:
    """The texts of one source row (possibly empty strings, checked by the caller)."""
    if spec.tags:
        return [join_tags(value, spec.tag_separator)]
    if value is None:
        return [""]
    if isinstance(value, str):
        return [" ".join(value.split())]
    texts = []
    for item in value:
        if item is not None and not isinstance(item, str):
            raise TypeError(f"a caption must be a string, got {item!r}")
        texts.append(" ".join((item or "").split()))
    return texts or [""]


def _image_reference(value: Any, spec: RowSpec) -> tuple[dict[str, Any], str]:
    """(``{"bytes", "path"}`` for ``datasets.Image``, a readable name for messages)."""
    if isinstance(value, str):
        path = value if os.path.isabs(value) or spec.image_dir is None else os.path.join(spec.image_dir, value)
        return {"bytes": None, "path": path}, path
    if not isinstance(value, Mapping):
        raise ValueError(f"Unexpected image value {str(value)[:100]!r} in column {spec.image_column!r}.")
    path = value.get("path")
    if value.get("bytes") is None and path and not os.path.isabs(path) and spec.image_dir is not None:
        path = os.path.join(spec.image_dir, path)
    return {"bytes": value.get("bytes"), "path": path}, path or "<image bytes>"


def _is_readable_image(reference: dict[str, Any]) -> bool:
    try:
        source = io.BytesIO(reference["bytes"]) if reference["bytes"] is not None else reference["path"]
        with Image.open(source) as image:
            image.size  # noqa: B018 - the header is parsed lazily
        return True
    except (UnidentifiedImageError, OSError, ValueError):
        return False


@dataclass
class SplitPlan:
    """What the second pass writes for one split, per kept source row."""

    rows: list[int]  # source rows kept
    image_ids: list[int]
    keys: list[str]
    texts: list[list[str]]
    caption_ids: list[list[int]]


def plan_split(
    dataset: datasets.Dataset, spec: RowSpec, where: str, ids: dict[Any, int], counters: dict[str, int]
) -> SplitPlan:
    """First pass over one split: check every row, decide what is kept, number images and captions.

    ``ids`` (image key -> image id) and ``counters["caption"]`` (the next caption id) are shared by
    the splits of one build, so ids are unique across splits.
    """
    return _SplitPlanner(spec, where, ids, counters).run(dataset)


class _SplitPlanner:
    """The state of :func:`plan_split` over one split: the plan so far and the counts of skipped rows."""

    def __init__(self, spec: RowSpec, where: str, ids: dict[Any, int], counters: dict[str, int]) -> None:
        self.spec, self.where, self.ids, self.counters = spec, where, ids, counters
        self.missing = MissingFileCounter(spec.missing_images, "image")
        self.unreadable, self.first_unreadable = 0, None
        self.empty, self.first_empty = 0, None
        self.plan = SplitPlan([], [], [], [], [])

    def run(self, dataset: datasets.Dataset) -> SplitPlan:
        spec = self.spec
        columns = [spec.image_column, spec.caption_column] + [
            c for c in (spec.id_column, spec.caption_id_column, spec.key_column) if c is not None
        ]
        view = dataset.select_columns(list(dict.fromkeys(columns)))
        if isinstance(view.features[spec.image_column], datasets.Image):
            view = view.cast_column(spec.image_column, datasets.Image(decode=False))
        for start in range(0, len(view), SCAN_BATCH):
            batch = view[start : start + SCAN_BATCH]
            for offset, image_value in enumerate(batch[spec.image_column]):
                self._add_row(start + offset, image_value, {name: values[offset] for name, values in batch.items()})
        self.missing.report(self.where)
        if self.unreadable:
            logger.warning("Skipped %d unreadable image(s) in %s (first: %s).", self.unreadable, self.where,
                           self.first_unreadable)  # fmt: skip
        if self.empty:
            logger.warning("Dropped %d empty caption(s) in %s (first: %s).", self.empty, self.where, self.first_empty)
        if not self.plan.rows:
            raise ValueError(f"{self.where} has no usable image-caption pair left after the checks.")
        return self.plan

    def _add_row(self, row: int, image_value: Any, values: dict[str, Any]) -> None:
        """Check one source row and add it to the plan, or count it as skipped (or raise, by the policies)."""
        spec = self.spec
        reference, name = _image_reference(image_value, spec)
        key_column = spec.key_column or spec.id_column
        key = name if key_column is None else str(values[key_column])
        if key_column is None and spec.key_root is not None and reference["bytes"] is None:
            key = os.path.relpath(reference["path"], spec.key_root)
        label = f"{self.where} row {row} ({key})"
        if not self._image_is_usable(reference, name, label):
            return
        try:
            texts = _texts_of(values[spec.caption_column], spec)
        except TypeError as error:
            raise ValueError(f"{label}, column {spec.caption_column!r}: {error}.") from None
        caption_ids = None
        if spec.caption_id_column is not None:
            value = values[spec.caption_id_column]
            caption_ids = [int(v) for v in (value if isinstance(value, list) else [value])]
            if len(caption_ids) != len(texts):
                raise ValueError(
                    f"{label}: {len(caption_ids)} caption ids in {spec.caption_id_column!r} for {len(texts)} captions."
                )
        kept = [i for i, text in enumerate(texts) if text]
        if len(kept) < len(texts):
            what = "tag list" if spec.tags else "caption"
            if spec.empty_captions == "error":
                raise ValueError(
                    f"{label} has an empty {what} in column {spec.caption_column!r}. Fix the source, or pass "
                    "empty_captions='skip' to drop empty captions with a counted warning."
                )
            self.empty += len(texts) - len(kept)
            self.first_empty = self.first_empty or label
            if not kept:
                return
        image_id = self._image_id(row, reference, values)
        plan = self.plan
        plan.rows.append(row)
        plan.image_ids.append(image_id)
        plan.keys.append(key)
        plan.texts.append([texts[i] for i in kept])
        if caption_ids is None:
            caption_ids = list(range(self.counters["caption"], self.counters["caption"] + len(texts)))
            self.counters["caption"] += len(texts)
        plan.caption_ids.append([caption_ids[i] for i in kept])

    def _image_is_usable(self, reference: dict[str, Any], name: str, label: str) -> bool:
        """False for a missing or unreadable image that the policy skips (counted); raises under ``"error"``."""
        spec = self.spec
        if reference["bytes"] is None:
            if not reference["path"]:
                raise ValueError(f"{label} has no image (column {spec.image_column!r} is empty).")
            if self.missing.is_missing(reference["path"]):
                return False
        if spec.verify_images and spec.missing_images != "unchecked" and not _is_readable_image(reference):
            if spec.missing_images == "error":
                raise ValueError(
                    f"{name} ({label}) is not an image PIL can read. Remove it from the source, or pass "
                    "missing_images='skip' to skip unreadable images with a counted warning."
                )
            self.unreadable += 1
            self.first_unreadable = self.first_unreadable or name
            return False
        return True

    def _image_id(self, row: int, reference: dict[str, Any], values: dict[str, Any]) -> int:
        """The id-column value, else one id per image file (``group_by_path``), else one per source row."""
        spec, ids = self.spec, self.ids
        if spec.id_column is not None:
            value = values[spec.id_column]
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            return ids.setdefault(("key", value), len(ids))
        if spec.group_by_path and reference["bytes"] is None:
            return ids.setdefault(("path", os.path.abspath(reference["path"])), len(ids))
        image_id = len(ids)
        ids[("row", self.where, row)] = image_id
        return image_id
