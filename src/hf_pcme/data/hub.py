"""Any ``datasets`` dataset with an image column and a caption column: a Hub id or a local folder.

    load_hub("user/my-captions", image_column="img", caption_column="sentences")   # load_dataset
    load_hub("data/saved", caption_column="captions")                             # load_from_disk
    load_hub("user/web-photos", caption_column="tags", tags=True, id_column="photo_id")

A folder written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``) is read with
``datasets.load_from_disk``; anything else goes to ``datasets.load_dataset`` (a Hub id, a local
script or a data folder), with ``config_name`` and ``revision``. The image column holds images
(``datasets.Image``) or file paths (relative ones are resolved against ``image_dir``); the caption
column holds a caption or a list of captions per row (or a tag list, in tags mode). Rows sharing
an ``id_column`` value are one image, so a source with one row per caption works too.

The result is the caption-level format of the COCO loader (see ``_caption_rows``), cached under
``cache_dir`` and rebuilt whenever the source's fingerprint or files change. Images stored inside
the source as bytes are copied into that cache once per caption; images given as paths are not copied.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets

from hf_pcme.data._caption_rows import (
    DEFAULT_TAG_SEPARATOR,
    RowSpec,
    build_caption_rows,
    dataset_signature,
    rename_splits,
)


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json"))


def open_source(
    path: str | os.PathLike,
    *,
    config_name: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """The source splits: ``load_from_disk`` for a ``save_to_disk`` folder, else ``load_dataset``."""
    local = Path(path)
    if _is_saved_dataset(local):
        loaded: Any = datasets.load_from_disk(str(local))
    else:
        kwargs: dict[str, Any] = {"cache_dir": cache_dir}
        if revision is not None:
            kwargs["revision"] = revision
        loaded = datasets.load_dataset(os.fspath(path), config_name, **kwargs)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def load_hub(
    data_dir: str | os.PathLike,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    id_column: str | None = None,
    config_name: str | None = None,
    revision: str | None = None,
    splits: dict[str, str] | list[str] | None = None,
    image_dir: str | os.PathLike | None = None,
    tags: bool = False,
    tag_separator: str = DEFAULT_TAG_SEPARATOR,
    missing_images: str = "error",
    empty_captions: str = "error",
    verify_images: bool = True,
    cache_dir: str | os.PathLike | None = None,
    split: str | None = None,
) -> datasets.DatasetDict | datasets.Dataset:
    """Caption-level splits of a ``datasets`` dataset (Hub id or local path).

    Args:
        data_dir: a Hub dataset id, or a local folder (``save_to_disk`` output, or data files).
        image_column: images (``datasets.Image``) or image file paths.
        caption_column: a caption or a list of captions per row (tags mode: a tag list).
        id_column: rows with the same value are one image (integers are kept as ``image_id``).
        config_name / revision: passed to ``load_dataset``.
        splits: which splits, and their names (``{"val": "validation"}``: ours -> the source's);
            default all, ``validation`` renamed ``val``.
        image_dir: folder that relative image paths are relative to (default: ``data_dir`` if local).
        tags: tags mode (one text per image: its tags joined with ``tag_separator`` in stored order).
        missing_images / empty_captions / verify_images: bad-row policies (see ``load_imagefolder``).
        cache_dir: where the Arrow caches live (default: the ``datasets`` cache).
        split: return only this split.
    """
    cache = None if cache_dir is None else os.fspath(cache_dir)
    if image_dir is None and Path(data_dir).is_dir():
        image_dir = data_dir
    source = open_source(data_dir, config_name=config_name, revision=revision, cache_dir=cache)
    chosen = rename_splits(source, splits, f"dataset {os.fspath(data_dir)!r}")
    spec = RowSpec(
        image_column=image_column, caption_column=caption_column, id_column=id_column, tags=tags,
        tag_separator=tag_separator, image_dir=None if image_dir is None else os.path.abspath(image_dir),
        missing_images=missing_images, empty_captions=empty_captions, verify_images=verify_images,
    )
    signature = ";".join(f"{name}={dataset_signature(dataset)}" for name, dataset in chosen.items())
    return build_caption_rows(
        lambda: chosen, spec, source_name=f"dataset {os.fspath(data_dir)!r}", source_signature=signature,
        cache_dir=cache, module_files=(__file__,), split=split,
    )
