"""MS-COCO 2014 captions in the Karpathy split, built from the official files with ``datasets``.

Splits (docs/formulas.md, "Evaluation protocols"): ``train`` = Karpathy train + restval (113,287 images, ~566k captions),
``val`` (5,000 images) and ``test`` (5,000 images / 25,000 captions). One row per caption::

    image                datasets.Image()  path to the JPEG, decoded lazily (may be grayscale: see transforms)
    image_id             int64   COCO image id (Karpathy "cocoid")
    caption              string  the Karpathy "raw" sentence, whitespace collapsed
    caption_id           int64   COCO caption annotation id
    labels_multi_hot     int8[80] instance categories present in the image (all zero: no instance annotation)
    karpathy_split       string  train | restval | val | test
    karpathy_sentence_id int64   Karpathy "sentid" (not a COCO id)

``labels_multi_hot`` has 80 entries, one per COCO category in increasing category-id order (the
ids run 1..90 with gaps). The original PCME code used a 90-d vector indexed by ``category_id - 1``
with 10 entries always zero; PMRP only uses Hamming distances between these vectors, which the
dropped always-zero entries do not change.

Karpathy sentence ids are not COCO annotation ids, so each sentence is matched to an annotation of
the same image by its text with whitespace collapsed; if that fails, ignoring case and punctuation.
Duplicate captions of one image are matched to distinct annotations.

The build streams all JSON files item by item (``_json_stream``) and writes Arrow in batches, so
memory holds a few compact numpy index arrays rather than the decoded JSON. Every check (unknown
images, unmatched sentences, images missing on disk) runs in a first pass, before any Arrow is
written. The result is cached under ``cache_dir``; a second ``load_coco`` memory-maps it.
Retrieval evaluation views: :func:`hf_pcme.data.views.make_retrieval_split`.
"""

from __future__ import annotations

import os
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from hf_pcme.data._common import (
    ArrowBatcher,
    MissingFileCounter,
    build_with_cache,
    code_hash,
    file_signature,
    logger,
    require_dir,
    require_file,
)
from hf_pcme.data._json_stream import MalformedJSONError, iter_json_object
from hf_pcme.registry import check_choice

NUM_COCO_CATEGORIES = 80
SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
UNMATCHED_CAPTION_POLICIES = ("error", "skip")
COCO_LAYOUT = """\
  <data_dir>/
    annotations/captions_train2014.json    official COCO 2014 captions
    annotations/captions_val2014.json
    annotations/instances_train2014.json   official COCO 2014 instances (for the 80-d category labels)
    annotations/instances_val2014.json
    train2014/COCO_train2014_<12-digit id>.jpg
    val2014/COCO_val2014_<12-digit id>.jpg
    dataset_coco.json                      Karpathy split (or pass karpathy_json=...)"""

_WORDS = re.compile(r"[a-z0-9]+")


def coco_features() -> datasets.Features:
    return datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "caption": datasets.Value("string"),
            "caption_id": datasets.Value("int64"),
            "labels_multi_hot": datasets.List(datasets.Value("int8"), length=NUM_COCO_CATEGORIES),
            "karpathy_split": datasets.Value("string"),
            "karpathy_sentence_id": datasets.Value("int64"),
        }
    )


def _exact_key(text: str) -> int:
    return hash(" ".join(text.split()))


def _loose_key(text: str) -> int:
    return hash(" ".join(_WORDS.findall(text.lower())))


def _int_field(item: Any, name: str, path: Path, array_name: str, index: int) -> int:
    value = item.get(name) if isinstance(item, dict) else None
    if not isinstance(value, int):
        raise MalformedJSONError(
            f"Item {index} of {array_name!r} in {path} has no integer {name!r}: {str(item)[:200]}"
        )
    return value


def _str_field(item: Any, name: str, path: Path, array_name: str, index: int) -> str:
    value = item.get(name) if isinstance(item, dict) else None
    if not isinstance(value, str):
        raise MalformedJSONError(f"Item {index} of {array_name!r} in {path} has no string {name!r}: {str(item)[:200]}")
    return value


def _require_arrays(path: Path, seen: set[str], names: tuple[str, ...], kind: str) -> None:
    for name in names:
        if name not in seen:
            raise MalformedJSONError(f"{path} has no {name!r} array; expected the official COCO {kind} format.")


def _check_known_images(path: Path, what: str, image_ids: np.ndarray, item_ids: np.ndarray, known: np.ndarray) -> None:
    unknown = ~np.isin(image_ids, known)
    if unknown.any():
        first = int(np.flatnonzero(unknown)[0])
        raise ValueError(
            f"{int(unknown.sum())} {what} in {path} point at images not listed in its 'images' array "
            f"(first: annotation id {int(item_ids[first])} -> image_id {int(image_ids[first])})."
        )


class _CaptionIndex:
    """COCO caption annotations sorted by image id, with two text keys for matching sentences."""

    def __init__(self) -> None:
        self.known_images = array("q")
        self._image_ids, self._annotation_ids = array("q"), array("q")
        self._exact, self._loose = array("q"), array("q")

    def read(self, path: Path) -> None:
        seen: set[str] = set()
        first_annotation = len(self._image_ids)
        file_images = array("q")
        for key, item, is_item in iter_json_object(path, ("images", "annotations")):
            seen.add(key)
            if not is_item:
                continue
            if key == "images":
                file_images.append(_int_field(item, "id", path, key, len(file_images)))
            else:
                index = len(self._image_ids) - first_annotation
                caption = _str_field(item, "caption", path, key, index)
                self._image_ids.append(_int_field(item, "image_id", path, key, index))
                self._annotation_ids.append(_int_field(item, "id", path, key, index))
                self._exact.append(_exact_key(caption))
                self._loose.append(_loose_key(caption))
        _require_arrays(path, seen, ("images", "annotations"), "captions")
        _check_known_images(
            path,
            "caption annotations",
            np.frombuffer(self._image_ids, np.int64)[first_annotation:],
            np.frombuffer(self._annotation_ids, np.int64)[first_annotation:],
            np.frombuffer(file_images, np.int64),
        )
        self.known_images.extend(file_images)

    def finalize(self) -> None:
        image_ids = np.frombuffer(self._image_ids, np.int64)
        order = np.argsort(image_ids, kind="stable")
        self.image_ids = image_ids[order]
        self.annotation_ids = np.frombuffer(self._annotation_ids, np.int64)[order]
        self.exact = np.frombuffer(self._exact, np.int64)[order]
        self.loose = np.frombuffer(self._loose, np.int64)[order]
        self.known_images = np.unique(np.frombuffer(self.known_images, np.int64))
        del self._image_ids, self._annotation_ids, self._exact, self._loose

    def is_known(self, image_id: int) -> bool:
        position = np.searchsorted(self.known_images, image_id)
        return bool(position < len(self.known_images) and self.known_images[position] == image_id)

    def match(self, image_id: int, sentences: list[str]) -> list[int]:
        """COCO annotation id of each sentence of ``image_id`` (-1: no match), each used at most once."""
        low, high = np.searchsorted(self.image_ids, [image_id, image_id + 1])
        annotation_ids = self.annotation_ids[low:high].tolist()
        candidate_keys = ((self.exact[low:high].tolist(), _exact_key), (self.loose[low:high].tolist(), _loose_key))
        free = [True] * len(annotation_ids)
        matches = []
        for text in sentences:
            found = -1
            for keys, key_of in candidate_keys:
                key = key_of(text)
                found = next((j for j, other in enumerate(keys) if free[j] and other == key), -1)
                if found >= 0:
                    break
            if found >= 0:
                free[found] = False
            matches.append(annotation_ids[found] if found >= 0 else -1)
        return matches


class _CategoryLabels:
    """80-d multi-hot instance-category vectors per image, from the instances files."""

    def __init__(self) -> None:
        self._pairs_image, self._pairs_category = array("q"), array("q")
        self._images = array("q")
        self.category_ids: np.ndarray | None = None

    def read(self, path: Path) -> None:
        seen: set[str] = set()
        first_pair = len(self._pairs_image)
        file_images = array("q")
        annotation_ids = array("q")
        categories = None
        for key, item, is_item in iter_json_object(path, ("images", "annotations")):
            seen.add(key)
            if key == "images" and is_item:
                file_images.append(_int_field(item, "id", path, key, len(file_images)))
            elif key == "annotations" and is_item:
                index = len(annotation_ids)
                self._pairs_image.append(_int_field(item, "image_id", path, key, index))
                self._pairs_category.append(_int_field(item, "category_id", path, key, index))
                annotation_ids.append(item["id"] if isinstance(item.get("id"), int) else -1)
            elif key == "categories":
                categories = item
        _require_arrays(path, seen, ("images", "annotations", "categories"), "instances")
        if not isinstance(categories, list):
            raise MalformedJSONError(f"'categories' in {path} is not an array.")
        category_ids = np.sort([_int_field(c, "id", path, "categories", i) for i, c in enumerate(categories)])
        if len(category_ids) != NUM_COCO_CATEGORIES or len(np.unique(category_ids)) != NUM_COCO_CATEGORIES:
            raise ValueError(
                f"{path} lists {len(np.unique(category_ids))} distinct categories; the COCO 2014 "
                f"instances files have {NUM_COCO_CATEGORIES}."
            )
        if self.category_ids is not None and not np.array_equal(self.category_ids, category_ids):
            raise ValueError(f"The categories of {path} differ from those of the other instances file.")
        self.category_ids = category_ids
        pair_images = np.frombuffer(self._pairs_image, np.int64)[first_pair:]
        _check_known_images(
            path, "instance annotations", pair_images, np.frombuffer(annotation_ids, np.int64),
            np.frombuffer(file_images, np.int64),
        )
        pair_categories = np.frombuffer(self._pairs_category, np.int64)[first_pair:]
        unknown = ~np.isin(pair_categories, category_ids)
        if unknown.any():
            raise ValueError(
                f"{path}: an instance annotation has category_id {int(pair_categories[unknown][0])}, "
                "which is not in its 'categories'."
            )
        self._images.extend(file_images)

    def finalize(self) -> None:
        self.image_ids = np.unique(np.frombuffer(self._images, np.int64))
        pair_images = np.frombuffer(self._pairs_image, np.int64)
        pair_categories = np.frombuffer(self._pairs_category, np.int64)
        self.multi_hot = np.zeros((len(self.image_ids), NUM_COCO_CATEGORIES), np.int8)
        self.multi_hot[
            np.searchsorted(self.image_ids, pair_images), np.searchsorted(self.category_ids, pair_categories)
        ] = 1
        del self._pairs_image, self._pairs_category, self._images

    def row(self, image_id: int) -> int:
        """Row of ``image_id`` in ``multi_hot``, or -1 when the instances files do not list it."""
        position = int(np.searchsorted(self.image_ids, image_id))
        return position if position < len(self.image_ids) and self.image_ids[position] == image_id else -1


@dataclass
class CocoKarpathyConfig(datasets.BuilderConfig):
    """``data_dir``: the COCO root (see ``COCO_LAYOUT``); other fields: see :func:`load_coco`."""

    karpathy_json: str | None = None
    missing_images: str = "error"
    unmatched_captions: str = "error"
    source_signature: str = ""


class CocoKarpathy(datasets.ArrowBasedBuilder):
    """``datasets`` builder for COCO 2014 captions in the Karpathy split (see the module docstring)."""

    BUILDER_CONFIG_CLASS = CocoKarpathyConfig

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description="MS-COCO 2014 captions, Karpathy split (train = train + restval).",
            features=coco_features(),
        )

    def _paths(self) -> dict[str, Path]:
        return coco_source_paths(self.config.data_dir, self.config.karpathy_json)

    def _split_generators(self, dl_manager: Any) -> list[datasets.SplitGenerator]:
        paths = self._paths()
        captions, labels = _CaptionIndex(), _CategoryLabels()
        for part in ("train", "val"):
            captions.read(paths[f"captions_{part}"])
            labels.read(paths[f"instances_{part}"])
        captions.finalize()
        labels.finalize()
        plan = self._plan(paths["karpathy"], captions, labels)
        return [
            datasets.SplitGenerator(name=name, gen_kwargs={"split": name, "plan": plan, "labels": labels})
            for name in SPLITS
        ]

    def _iter_karpathy_images(self, path: Path) -> Iterator[Any]:
        seen = False
        for key, item, is_item in iter_json_object(path, ("images",)):
            if key != "images":
                continue
            seen = True
            if is_item:
                yield item
        if not seen:
            raise MalformedJSONError(f"{path} has no 'images' array; expected the Karpathy dataset_coco.json format.")

    def _image_record(self, item: Any, index: int, path: Path) -> tuple[int, str, str, list[dict[str, Any]]]:
        cocoid = _int_field(item, "cocoid", path, "images", index)
        split = _str_field(item, "split", path, "images", index)
        if split not in ("train", "restval", "val", "test"):
            raise MalformedJSONError(
                f"Image cocoid={cocoid} in {path} has split {split!r}; expected train|restval|val|test."
            )
        filename = _str_field(item, "filename", path, "images", index)
        # Karpathy's "filepath" is train2014 / val2014; infer it from COCO_<folder>_<id>.jpg if absent.
        folder = item.get("filepath") or (filename.split("_")[1] if filename.count("_") >= 2 else "")
        sentences = item.get("sentences")
        if not isinstance(sentences, list) or not all(
            isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences
        ):
            raise MalformedJSONError(
                f"Image cocoid={cocoid} in {path} needs a 'sentences' list of {{'raw', 'sentid'}}."
            )
        image_path = os.path.join(self.config.data_dir, folder, filename)
        return cocoid, split, image_path, sentences

    def _plan(self, path: Path, captions: _CaptionIndex, labels: _CategoryLabels) -> dict[str, np.ndarray]:
        """First pass over the Karpathy file: check everything, match sentences, decide what to keep."""
        missing = MissingFileCounter(self.config.missing_images, "COCO image")
        keep_image = array("b")
        sentence_annotation = array("q")
        seen_images: set[int] = set()
        unmatched, first_unmatched = 0, None
        for index, item in enumerate(self._iter_karpathy_images(path)):
            cocoid, split, image_path, sentences = self._image_record(item, index, path)
            if cocoid in seen_images:
                raise ValueError(f"Image cocoid={cocoid} appears twice in {path}.")
            seen_images.add(cocoid)
            if not captions.is_known(cocoid):
                raise ValueError(f"Image cocoid={cocoid} ({image_path}) of {path} is not in captions_*2014.json.")
            if labels.row(cocoid) < 0:
                raise ValueError(f"Image cocoid={cocoid} ({image_path}) of {path} is not in instances_*2014.json.")
            matches = captions.match(cocoid, [s["raw"] for s in sentences])
            for sentence, annotation_id in zip(sentences, matches):
                if annotation_id >= 0:
                    continue
                if self.config.unmatched_captions == "error":
                    raise ValueError(
                        f"Karpathy sentence sentid={sentence.get('sentid')} of image cocoid={cocoid} "
                        f"({sentence['raw']!r}) matches no caption of that image in captions_*2014.json "
                        "(compared with whitespace collapsed, then ignoring case and punctuation). Pass "
                        "unmatched_captions='skip' to drop such sentences with a counted warning."
                    )
                unmatched += 1
                first_unmatched = first_unmatched or (cocoid, sentence["raw"])
            sentence_annotation.extend(matches)
            keep_image.append(0 if missing.is_missing(image_path) else 1)
        missing.report(str(path))
        if unmatched:
            logger.warning(
                "Dropped %d Karpathy sentence(s) that match no COCO caption (first: image %d, %r).",
                unmatched, *first_unmatched,
            )
        return {
            "keep_image": np.frombuffer(keep_image, np.int8).astype(bool),
            "sentence_annotation": np.frombuffer(sentence_annotation, np.int64),
        }

    def _generate_tables(self, split: str, plan: dict[str, np.ndarray], labels: _CategoryLabels):
        path = self._paths()["karpathy"]
        batcher = ArrowBatcher(self.info.features)
        sentence_offset = 0
        for index, item in enumerate(self._iter_karpathy_images(path)):
            cocoid, karpathy_split, image_path, sentences = self._image_record(item, index, path)
            annotation_ids = plan["sentence_annotation"][sentence_offset : sentence_offset + len(sentences)]
            sentence_offset += len(sentences)
            if karpathy_split not in SPLITS[split] or not plan["keep_image"][index]:
                continue
            multi_hot = labels.multi_hot[labels.row(cocoid)]
            for sentence, annotation_id in zip(sentences, annotation_ids.tolist()):
                if annotation_id < 0:
                    continue
                table = batcher.add(
                    {
                        "image": image_path,
                        "image_id": cocoid,
                        "caption": " ".join(sentence["raw"].split()),
                        "caption_id": annotation_id,
                        "labels_multi_hot": multi_hot,
                        "karpathy_split": karpathy_split,
                        "karpathy_sentence_id": int(sentence.get("sentid", -1)),
                    }
                )
                if table is not None:
                    yield f"{split}-{index}", table
        table = batcher.flush()
        if table is not None:
            yield f"{split}-end", table


def coco_source_paths(data_dir: str | os.PathLike, karpathy_json: str | os.PathLike | None = None) -> dict[str, Path]:
    """The five annotation files of a COCO root, checked to exist (``FileNotFoundError`` shows the layout)."""
    root = require_dir(data_dir, "COCO data_dir", COCO_LAYOUT)
    annotations = require_dir(root / "annotations", "COCO annotations folder", COCO_LAYOUT)
    paths = {
        f"{kind}_{part}": require_file(annotations / f"{kind}_{part}2014.json", f"COCO {kind} file", COCO_LAYOUT)
        for kind in ("captions", "instances")
        for part in ("train", "val")
    }
    if karpathy_json is None:
        candidates = [root / "dataset_coco.json", annotations / "dataset_coco.json"]
        karpathy_json = next((c for c in candidates if c.is_file()), candidates[0])
    paths["karpathy"] = require_file(karpathy_json, "Karpathy split file (dataset_coco.json)", COCO_LAYOUT)
    return paths


def load_coco(
    data_dir: str | os.PathLike,
    *,
    karpathy_json: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    missing_images: str = "error",
    unmatched_captions: str = "error",
    split: str | None = None,
) -> datasets.DatasetDict | datasets.Dataset:
    """Build (first call) or memory-map (later calls) COCO 2014 captions in the Karpathy split.

    Args:
        data_dir: COCO root with ``annotations/``, ``train2014/``, ``val2014/`` (see ``COCO_LAYOUT``).
        karpathy_json: ``dataset_coco.json``; default ``data_dir/dataset_coco.json``.
        cache_dir: where the Arrow cache lives (default: the ``datasets`` cache).
        missing_images: ``"error"`` (raise naming the file), ``"skip"`` (drop the image and its
            captions, with one counted warning) or ``"unchecked"`` (do not look at the disk).
        unmatched_captions: ``"error"`` or ``"skip"`` for Karpathy sentences that match no COCO caption.
        split: return only this split (``"train"``, ``"val"`` or ``"test"``).

    Returns:
        A ``DatasetDict`` (or one ``Dataset``) with one row per caption (see the module docstring).
    """
    check_choice(missing_images, ("error", "skip", "unchecked"), "missing_images")
    check_choice(unmatched_captions, UNMATCHED_CAPTION_POLICIES, "unmatched_captions")
    if split is not None:
        check_choice(split, SPLITS, "split")
    paths = coco_source_paths(data_dir, karpathy_json)
    builder = CocoKarpathy(
        cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        hash=code_hash(__file__, _json_stream_file()),
        data_dir=os.path.abspath(data_dir),
        karpathy_json=os.path.abspath(paths["karpathy"]),
        missing_images=missing_images,
        unmatched_captions=unmatched_captions,
        source_signature=file_signature(paths.values()),
    )
    splits = build_with_cache(builder)
    return splits if split is None else splits[split]


def _json_stream_file() -> str:
    from hf_pcme.data import _json_stream

    return _json_stream.__file__
