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

The first pass (:class:`RowSpec`, :func:`plan_split`) is in :mod:`hf_pcme.data._caption_rows_scan`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from hf_pcme.data import _caption_rows_scan
from hf_pcme.data._caption_rows_scan import (
    DEFAULT_TAG_SEPARATOR,
    EMPTY_CAPTION_POLICIES,
    SCAN_BATCH,
    RowSpec,
    SplitPlan,
    _image_reference,
    join_tags,
    plan_split,
)
from hf_pcme.data._common import ArrowBatcher, build_with_cache, code_hash, file_signature
from hf_pcme.registry import check_choice

#: Source split names renamed to the package's names (COCO, CUB and shapes call it "val").
SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}


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
            plans[name] = plan_split(dataset, spec, where, ids, counters)
        return [
            datasets.SplitGenerator(name=name, gen_kwargs={"name": name, "plan": plan}) for name, plan in plans.items()
        ]

    def _generate_tables(self, name: str, plan: SplitPlan) -> Iterator[tuple[str, Any]]:
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
        hash=code_hash(__file__, _caption_rows_scan.__file__, *module_files),
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


__all__ = [
    "DEFAULT_TAG_SEPARATOR",
    "EMPTY_CAPTION_POLICIES",
    "SCAN_BATCH",
    "SPLIT_ALIASES",
    "CaptionRows",
    "CaptionRowsConfig",
    "RowSpec",
    "build_caption_rows",
    "caption_rows_features",
    "dataset_signature",
    "join_tags",
    "rename_splits",
]
