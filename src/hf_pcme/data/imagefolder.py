"""Your own images: a folder of image files plus ``metadata.jsonl`` or ``metadata.csv`` with their captions.

Read with ``datasets``' own ``imagefolder`` builder (so its conventions hold: split folders named
``train/``, ``val/`` / ``validation/``, ``test/``, or a single folder = one ``train`` split), then
turned into the caption-level format of the COCO loader (see ``_caption_rows``)::

    photos/
      train/metadata.jsonl     {"file_name": "0001.jpg", "captions": ["a dog on a beach", "a wet dog"]}
      train/0001.jpg           ... one JSON object per line, any number of captions per image
      test/metadata.csv        file_name,caption      (CSV: one caption per row; repeat file_name
      test/0002.jpg            0002.jpg,a red bus      for more captions of the same image)

    load_imagefolder("photos")                          # captions from "captions" / "caption" / "text"
    load_imagefolder("photos", caption_column="tags", tags=True)   # {"tags": ["dog", "beach"]} -> "dog, beach"

Rows that name the same image file are one image (same ``image_id``). A ``validation`` split is
renamed ``val``. Missing or unreadable images, empty captions and unknown columns raise errors
that name the file or the column (or are skipped with a counted warning, see the options).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import datasets

from hf_pcme.data._caption_rows import DEFAULT_TAG_SEPARATOR, RowSpec, build_caption_rows, rename_splits
from hf_pcme.data._common import file_signature, require_dir

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMN_CANDIDATES = ("captions", "caption", "text", "sentences")
TAG_COLUMN_CANDIDATES = ("tags", "tag", "labels", "keywords")
IMAGEFOLDER_LAYOUT = """\
  <data_dir>/
    metadata.jsonl      {"file_name": "a.jpg", "captions": ["...", "..."]} per line (or metadata.csv)
    a.jpg ...
  or one such folder per split: <data_dir>/train/, <data_dir>/val/, <data_dir>/test/"""


def _metadata_files(root: Path) -> list[Path]:
    return sorted(path for name in METADATA_FILES for path in root.rglob(name))


def _metadata_columns(path: Path) -> list[str]:
    """The column names of a metadata file (the first JSON line's keys, or the CSV header)."""
    with open(path, encoding="utf-8", newline="") as handle:
        if path.suffix == ".csv":
            return next(csv.reader(handle), [])
        for line in handle:
            if line.strip():
                try:
                    return list(json.loads(line))
                except (json.JSONDecodeError, TypeError):
                    raise ValueError(f"{path}: the first line is not a JSON object: {line[:200]!r}") from None
    return []


def _pick_column(columns: list[str], wanted: str | None, tags: bool, where: str) -> str:
    if wanted is not None:
        return wanted  # checked (with the list of columns) when the rows are built
    candidates = TAG_COLUMN_CANDIDATES if tags else CAPTION_COLUMN_CANDIDATES
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        kind = "tags" if tags else "captions"
        raise ValueError(
            f"No {kind} column found in the metadata of {where} (looked for {', '.join(candidates)}); its columns "
            f"are: {', '.join(columns)}. Pass caption_column=<name>."
        )
    return found


def _caption_column(root: Path, caption_column: str | None, tags: bool) -> str:
    """The caption (or tags) column, from the first metadata file under ``root``; raises when there is none."""
    metadata = _metadata_files(root)
    if not metadata:
        raise FileNotFoundError(
            f"No metadata.jsonl or metadata.csv under {root}: the captions of the images must be listed there.\n"
            f"Expected layout:\n{IMAGEFOLDER_LAYOUT}"
        )
    columns = _metadata_columns(metadata[0])
    return _pick_column(columns, caption_column, tags, str(metadata[0]))


def _source_files(root: Path, cache: str | None) -> list[str]:
    """Every file under ``root`` (sorted), except those of an Arrow cache kept inside it."""
    inside_cache = Path(cache).resolve() if cache is not None else None
    return sorted(
        str(path) for path in root.rglob("*")
        if path.is_file() and (inside_cache is None or inside_cache not in path.resolve().parents)
    )


def load_imagefolder(
    data_dir: str | os.PathLike,
    *,
    caption_column: str | None = None,
    tags: bool = False,
    tag_separator: str = DEFAULT_TAG_SEPARATOR,
    id_column: str | None = None,
    splits: dict[str, str] | list[str] | None = None,
    missing_images: str = "error",
    empty_captions: str = "error",
    verify_images: bool = True,
    cache_dir: str | os.PathLike | None = None,
    split: str | None = None,
) -> datasets.DatasetDict | datasets.Dataset:
    """Caption-level splits of an image folder with captions (or tags) in ``metadata.jsonl`` / ``.csv``.

    Args:
        data_dir: the folder (see ``IMAGEFOLDER_LAYOUT``).
        caption_column: metadata column with a caption or a list of captions per row (default: the
            first of ``captions``, ``caption``, ``text``, ``sentences``; in tags mode ``tags``, ``tag``,
            ``labels``, ``keywords``).
        tags: tags mode: the column holds a tag list (or a comma-separated string) per image; its
            tags are joined in stored order with ``tag_separator`` (repeats and empty tags dropped).
        id_column: metadata column grouping rows into images (default: the image file).
        splits: which splits, and their names (``{"val": "validation"}``: ours -> the folder's);
            default all, ``validation`` renamed ``val``.
        missing_images: ``"error"`` (raise naming the file), ``"skip"`` (drop missing or unreadable
            images, one counted warning) or ``"unchecked"``.
        empty_captions: ``"error"`` or ``"skip"`` for empty captions / tag lists.
        verify_images: open every image's header with PIL to catch files that are not images.
        cache_dir: where the Arrow caches live (default: the ``datasets`` cache).
        split: return only this split.
    """
    root = require_dir(data_dir, "Image folder", IMAGEFOLDER_LAYOUT).resolve()
    column = _caption_column(root, caption_column, tags)
    spec = RowSpec(
        image_column="image", caption_column=column, id_column=id_column, tags=tags, tag_separator=tag_separator,
        missing_images=missing_images, empty_captions=empty_captions, verify_images=verify_images,
        group_by_path=True, key_root=str(root),
    )
    cache = None if cache_dir is None else os.fspath(cache_dir)
    # Every file's size and time: adding, removing or editing an image or the metadata rebuilds the cache.
    files = _source_files(root, cache)

    def sources() -> dict[str, datasets.Dataset]:
        image_level = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=cache)
        return rename_splits(image_level, splits, f"image folder {root}")

    return build_caption_rows(
        sources, spec, source_name=f"image folder {root}", source_signature=file_signature(files) + repr(splits),
        cache_dir=cache, module_files=(__file__,), split=split,
    )
