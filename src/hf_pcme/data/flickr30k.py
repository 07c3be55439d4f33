"""Flickr30K in the Karpathy split (``dataset_flickr30k.json``): 29,000 train, 1,014 val, 1,000 test images.

The test split is the standard **1K test protocol** (1,000 images, 5,000 captions, ranked all at
once; there are no folds as in COCO's 1K). Rows follow the caption-level format of the COCO
loader (see ``_caption_rows``), plus::

    image_id        int64   the photo's Flickr id (the numeric file name stem, e.g. 1000092795.jpg)
    caption_id      int64   Karpathy "sentid"
    caption         string  Karpathy "raw" sentence, whitespace collapsed
    image_key       string  the file name

Karpathy also has a ``restval`` split for COCO only; Flickr30K's file uses train / val / test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

from hf_pcme.data._caption_rows import RowSpec, build_caption_rows
from hf_pcme.data._common import file_signature, require_dir, require_file

SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
FLICKR30K_LAYOUT = """\
  <data_dir>/
    dataset_flickr30k.json      Karpathy split (or pass karpathy_json=...)
    flickr30k-images/<id>.jpg   the 31,783 photos (or pass image_dir=...)"""


def _read_karpathy(path: Path) -> dict[str, dict[str, list]]:
    """Image-level columns per split, checked: file name, Flickr id, captions, sentence ids."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"Malformed JSON in {path}: {error}.") from None
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list):
        raise ValueError(f"{path} has no 'images' array; expected Karpathy's dataset_flickr30k.json format.")
    columns = {name: {"file": [], "image_id": [], "captions": [], "sentids": []} for name in SPLITS}
    seen: set[str] = set()
    for index, item in enumerate(images):
        filename = item.get("filename") if isinstance(item, dict) else None
        split = item.get("split") if isinstance(item, dict) else None
        sentences = item.get("sentences") if isinstance(item, dict) else None
        if not isinstance(filename, str) or not isinstance(sentences, list):
            raise ValueError(f"Image {index} of {path} needs a string 'filename' and a 'sentences' list: {str(item)[:200]}")
        target = next((name for name, parts in SPLITS.items() if split in parts), None)
        if target is None:
            raise ValueError(f"Image {filename} in {path} has split {split!r}; expected train, val or test.")
        if filename in seen:
            raise ValueError(f"Image {filename} appears twice in {path}.")
        seen.add(filename)
        if not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
            raise ValueError(f"Image {filename} in {path}: every sentence needs a string 'raw'.")
        stem = Path(filename).stem
        column = columns[target]
        column["file"].append(filename)
        column["image_id"].append(int(stem) if stem.isdigit() else int(item.get("imgid", index)))
        column["captions"].append([s["raw"] for s in sentences])
        column["sentids"].append([int(s.get("sentid", -1)) for s in sentences])
    return columns


def load_flickr30k(
    data_dir: str | os.PathLike,
    *,
    karpathy_json: str | os.PathLike | None = None,
    image_dir: str | os.PathLike | None = None,
    missing_images: str = "error",
    empty_captions: str = "error",
    verify_images: bool = False,
    cache_dir: str | os.PathLike | None = None,
    split: str | None = None,
) -> datasets.DatasetDict | datasets.Dataset:
    """Build (first call) or memory-map (later calls) Flickr30K captions in the Karpathy split.

    Args:
        data_dir: the Flickr30K root (see ``FLICKR30K_LAYOUT``).
        karpathy_json: ``dataset_flickr30k.json``; default ``data_dir/dataset_flickr30k.json``.
        image_dir: the photos; default ``data_dir/flickr30k-images`` (or ``data_dir`` itself when
            that folder does not exist).
        missing_images / empty_captions / verify_images: bad-row policies (see ``load_imagefolder``);
            ``verify_images`` is off by default (opening 31,783 JPEGs takes a while).
        cache_dir: where the Arrow cache lives (default: the ``datasets`` cache).
        split: return only this split (``"train"``, ``"val"`` or ``"test"``).
    """
    root = require_dir(data_dir, "Flickr30K data_dir", FLICKR30K_LAYOUT)
    karpathy = require_file(
        karpathy_json if karpathy_json is not None else root / "dataset_flickr30k.json",
        "Karpathy split file (dataset_flickr30k.json)", FLICKR30K_LAYOUT,
    )
    if image_dir is None:
        image_dir = root / "flickr30k-images" if (root / "flickr30k-images").is_dir() else root
    images = require_dir(image_dir, "Flickr30K image folder", FLICKR30K_LAYOUT).resolve()
    spec = RowSpec(
        image_column="file", caption_column="captions", id_column="image_id", caption_id_column="sentids",
        key_column="file", image_dir=str(images), missing_images=missing_images, empty_captions=empty_captions,
        verify_images=verify_images,
    )

    def sources() -> dict[str, datasets.Dataset]:
        splits = _read_karpathy(karpathy)
        return {name: datasets.Dataset.from_dict(columns) for name, columns in splits.items() if columns["file"]}

    return build_caption_rows(
        sources, spec, source_name=str(karpathy), source_signature=file_signature([karpathy]) + str(images),
        cache_dir=cache_dir, module_files=(__file__,), split=split,
    )
