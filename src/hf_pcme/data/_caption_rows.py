"""Image-level ``datasets`` splits (an image column + a caption column) -> the caption-level format.

The generic loaders (``imagefolder``, ``hub``, ``flickr30k``) read their source into one
``datasets.Dataset`` per split with one row per image (or one row per caption, grouped by an id
column) and hand it to :func:`build_caption_rows`, which writes the same caption-level
``DatasetDict`` as the COCO loader, one row per caption::

    image       datasets.Image()  decoded lazily (a path, or the bytes stored in the source)
    image_id    int64   the image's id (see below); rows of one image share it
    caption     string  the caption (whitespace collapsed), or the image's tags joined (tags mode)
    caption_id  int64   unique across all splits
    image_key   string  what names the image in the source: its file name, or the id-column value

Text column. A row's value may be a string (one caption) or a list of strings (several captions
of that image, one output row each). In **tags mode** (``tags=True``) the value is the image's
tag list instead (a list of strings, or one string of comma-separated tags): the tags are
stripped, empty ones and repeats dropped (the first occurrence is kept), and the rest joined **in
the order the source stores them** with ``tag_separator`` (default ``", "``), giving one text per
image, e.g. ``"dog, beach, frisbee"``.

Image ids. With ``id_column`` rows sharing a value are one image (so a source with one row per
caption works); integer values are used as they are, other values are numbered in order of first
appearance. Without it every source row is its own image, numbered in order (across splits).

Every check runs over all splits before any Arrow is written (``datasets`` writes into a
temporary folder that it renames only on success), so a failed build leaves nothing in the cache:

- a missing image file (``missing_images="error"`` raises naming the file; ``"skip"`` drops the
  image with one counted warning; ``"unchecked"`` does not look), and with ``verify_images`` a file
  that PIL cannot read as an image (error or skip, with the same policy);
- an empty caption or tag list (``empty_captions="error"`` raises naming the image and column;
  ``"skip"`` drops that caption, or the image when none is left);
- an unknown column, or a column of the wrong type (the error lists the available columns).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
from PIL import Image, UnidentifiedImageError

from hf_pcme.data._common import (
    ArrowBatcher,
    MissingFileCounter,
    build_with_cache,
    code_hash,
    file_signature,
    logger,
)
from hf_pcme.registry import check_choice

EMPTY_CAPTION_POLICIES = ("error", "skip")
DEFAULT_TAG_SEPARATOR = ", "
#: Source split names renamed to the package's names (COCO, CUB and shapes call it "val").
SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}
SCAN_BATCH = 1000


def caption_rows_features() -> datasets.Features:
    return datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "caption": datasets.Value("string"),
            "caption_id": datasets.Value("int64"),
            "image_key": datasets.Value("string"),
        }
    )


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


def _column_error(column: str, option: str, where: str, available: Sequence[str]) -> ValueError:
    return ValueError(
        f"{option}={column!r} is not a column of {where}; available columns: {', '.join(available)}. "
        f"Pass {option}=<one of them>."
    )


def _check_columns(dataset: datasets.Dataset, spec: RowSpec, where: str) -> None:
    available = list(dataset.column_names)
    for option in ("image_column", "caption_column", "id_column", "caption_id_column", "key_column"):
        column = getattr(spec, option)
        if column is not None and column not in available:
            raise _column_error(column, option, where, available)
    image_feature = dataset.features[spec.image_column]
    if not (isinstance(image_feature, datasets.Image) or getattr(image_feature, "dtype", None) in ("string", "large_string")):
        raise ValueError(
            f"image_column={spec.image_column!r} of {where} holds {image_feature}; expected images "
            "(datasets.Image) or file paths (strings)."
        )
    text_feature = dataset.features[spec.caption_column]
    inner = getattr(text_feature, "feature", text_feature)
    if getattr(inner, "dtype", None) not in ("string", "large_string"):
        kind = "tags" if spec.tags else "captions"
        raise ValueError(
            f"caption_column={spec.caption_column!r} of {where} holds {text_feature}; expected {kind} as a string "
            "or a list of strings per row."
        )


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
class _SplitPlan:
    rows: list[int]  # source rows kept
    image_ids: list[int]
    keys: list[str]
    texts: list[list[str]]
    caption_ids: list[list[int]]


def _plan_split(
    dataset: datasets.Dataset, spec: RowSpec, where: str, ids: dict[Any, int], counters: dict[str, int]
) -> _SplitPlan:
    """First pass over one split: check every row, decide what is kept, number images and captions."""
    missing = MissingFileCounter(spec.missing_images, "image")
    unreadable, first_unreadable = 0, None
    empty, first_empty = 0, None
    plan = _SplitPlan([], [], [], [], [])
    columns = [spec.image_column, spec.caption_column] + [
        c for c in (spec.id_column, spec.caption_id_column, spec.key_column) if c is not None
    ]
    columns = list(dict.fromkeys(columns))
    view = dataset.select_columns(columns)
    if isinstance(view.features[spec.image_column], datasets.Image):
        view = view.cast_column(spec.image_column, datasets.Image(decode=False))
    for start in range(0, len(view), SCAN_BATCH):
        batch = view[start : start + SCAN_BATCH]
        for offset, image_value in enumerate(batch[spec.image_column]):
            row = start + offset
            reference, name = _image_reference(image_value, spec)
            key_column = spec.key_column or spec.id_column
            key = name if key_column is None else str(batch[key_column][offset])
            if key_column is None and spec.key_root is not None and reference["bytes"] is None:
                key = os.path.relpath(reference["path"], spec.key_root)
            label = f"{where} row {row} ({key})"
            if reference["bytes"] is None:
                if not reference["path"]:
                    raise ValueError(f"{label} has no image (column {spec.image_column!r} is empty).")
                if missing.is_missing(reference["path"]):
                    continue
            if spec.verify_images and spec.missing_images != "unchecked" and not _is_readable_image(reference):
                if spec.missing_images == "error":
                    raise ValueError(
                        f"{name} ({label}) is not an image PIL can read. Remove it from the source, or pass "
                        "missing_images='skip' to skip unreadable images with a counted warning."
                    )
                unreadable += 1
                first_unreadable = first_unreadable or name
                continue
            try:
                texts = _texts_of(batch[spec.caption_column][offset], spec)
            except TypeError as error:
                raise ValueError(f"{label}, column {spec.caption_column!r}: {error}.") from None
            caption_ids = None
            if spec.caption_id_column is not None:
                value = batch[spec.caption_id_column][offset]
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
                empty += len(texts) - len(kept)
                first_empty = first_empty or label
                if not kept:
                    continue
            if spec.id_column is not None:
                value = batch[spec.id_column][offset]
                if isinstance(value, int) and not isinstance(value, bool):
                    image_id = value
                else:
                    image_id = ids.setdefault(("key", value), len(ids))
            elif spec.group_by_path and reference["bytes"] is None:
                image_id = ids.setdefault(("path", os.path.abspath(reference["path"])), len(ids))
            else:
                image_id = len(ids)
                ids[("row", where, row)] = image_id
            plan.rows.append(row)
            plan.image_ids.append(image_id)
            plan.keys.append(key)
            plan.texts.append([texts[i] for i in kept])
            if caption_ids is None:
                caption_ids = list(range(counters["caption"], counters["caption"] + len(texts)))
                counters["caption"] += len(texts)
            plan.caption_ids.append([caption_ids[i] for i in kept])
    missing.report(where)
    if unreadable:
        logger.warning("Skipped %d unreadable image(s) in %s (first: %s).", unreadable, where, first_unreadable)
    if empty:
        logger.warning("Dropped %d empty caption(s) in %s (first: %s).", empty, where, first_empty)
    if not plan.rows:
        raise ValueError(f"{where} has no usable image-caption pair left after the checks.")
    return plan


@dataclass
class CaptionRowsConfig(datasets.BuilderConfig):
    """``source_signature`` identifies the source data (files, fingerprints); ``spec`` the conversion."""

    source_signature: str = ""
    spec: str = ""


class CaptionRows(datasets.ArrowBasedBuilder):
    """``datasets`` builder turning image-level source splits into caption-level rows (module docstring)."""

    BUILDER_CONFIG_CLASS = CaptionRowsConfig

    def __init__(self, *args: Any, sources: Callable[[], Mapping[str, datasets.Dataset]], row_spec: RowSpec,
                 source_name: str, **kwargs: Any) -> None:
        self._load_sources = sources  # called only when the Arrow cache has to be built
        self._sources: dict[str, datasets.Dataset] = {}
        self._row_spec = row_spec
        self._source_name = source_name
        super().__init__(*args, **kwargs)

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description="Caption-level image-text pairs.", features=caption_rows_features())

    def _split_generators(self, dl_manager: Any) -> list[datasets.SplitGenerator]:
        spec = self._row_spec
        ids: dict[Any, int] = {}
        counters = {"caption": 0}
        plans = {}
        self._sources = dict(self._load_sources())
        for name, dataset in self._sources.items():
            where = f"{self._source_name} split {name!r}"
            _check_columns(dataset, spec, where)
            plans[name] = _plan_split(dataset, spec, where, ids, counters)
        return [
            datasets.SplitGenerator(name=name, gen_kwargs={"name": name, "plan": plan}) for name, plan in plans.items()
        ]

    def _generate_tables(self, name: str, plan: _SplitPlan) -> Iterator[tuple[str, Any]]:
        spec = self._row_spec
        source = self._sources[name].select_columns([spec.image_column])
        if isinstance(source.features[spec.image_column], datasets.Image):
            source = source.cast_column(spec.image_column, datasets.Image(decode=False))
        batcher = ArrowBatcher(self.info.features)
        for start in range(0, len(plan.rows), SCAN_BATCH):
            images = source[plan.rows[start : start + SCAN_BATCH]][spec.image_column]
            for offset, image_value in enumerate(images):
                index = start + offset
                reference, _ = _image_reference(image_value, spec)
                for text, caption_id in zip(plan.texts[index], plan.caption_ids[index]):
                    table = batcher.add(
                        {
                            "image": reference,
                            "image_id": plan.image_ids[index],
                            "caption": text,
                            "caption_id": caption_id,
                            "image_key": plan.keys[index],
                        }
                    )
                    if table is not None:
                        yield f"{name}-{index}", table
        table = batcher.flush()
        if table is not None:
            yield f"{name}-end", table


def rename_splits(splits: Mapping[str, Any], mapping: Mapping[str, str] | Sequence[str] | None,
                  where: str) -> dict[str, Any]:
    """Select / rename source splits: ``{"val": "validation"}`` (ours: theirs), a list of names, or
    ``None`` (all, with "validation" / "valid" / "dev" renamed "val")."""
    available = list(splits)
    if mapping is None:
        renamed = {SPLIT_ALIASES.get(name, name): name for name in available}
    elif isinstance(mapping, Mapping):
        renamed = dict(mapping)
    else:
        renamed = {SPLIT_ALIASES.get(name, name): name for name in mapping}
    for ours, theirs in renamed.items():
        if theirs not in splits:
            raise ValueError(f"Split {theirs!r} (for {ours!r}) is not a split of {where}; it has: {', '.join(available)}.")
    return {ours: splits[theirs] for ours, theirs in renamed.items()}


def build_caption_rows(
    sources: Callable[[], Mapping[str, datasets.Dataset]],
    spec: RowSpec,
    *,
    source_name: str,
    source_signature: str,
    cache_dir: str | os.PathLike | None,
    module_files: Sequence[str] = (),
    split: str | None = None,
) -> datasets.DatasetDict | datasets.Dataset:
    """Build (first call) or memory-map (later calls) the caption-level splits of ``sources()``.

    ``sources`` returns the image-level splits; it is called only when the cache for
    ``source_signature`` (which must change whenever the source data does) has to be built.
    """
    spec.check()
    builder = CaptionRows(
        cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        hash=code_hash(__file__, *module_files),
        sources=sources,
        row_spec=spec,
        source_name=source_name,
        source_signature=source_signature,
        spec=json.dumps(spec.__dict__, sort_keys=True),
    )
    splits = build_with_cache(builder)
    return splits if split is None else splits[check_choice(split, splits, "split")]


def dataset_signature(dataset: datasets.Dataset) -> str:
    """The fingerprint of a dataset and the sizes / times of its Arrow files (for the cache key)."""
    files = [entry["filename"] for entry in dataset.cache_files]
    return dataset._fingerprint + ":" + (file_signature(files) if files else "memory")
