"""The official COCO 2014 annotation files, read into compact index arrays for the Karpathy-split builder.

:class:`CaptionIndex` holds the caption annotations (matched to Karpathy sentences by text),
:class:`CategoryLabels` the 80-d multi-hot instance categories; both stream their JSON files item by
item (:mod:`hf_pcme.data._json_stream`) and check them. Used by :mod:`hf_pcme.data.coco`.
"""

from __future__ import annotations

import re
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from hf_pcme.data._json_stream import MalformedJSONError, iter_json_object

NUM_COCO_CATEGORIES = 80

_WORDS = re.compile(r"[a-z0-9]+")


def _exact_key(text: str) -> int:
    return hash(" ".join(text.split()))


def _loose_key(text: str) -> int:
    return hash(" ".join(_WORDS.findall(text.lower())))


def int_field(item: Any, name: str, path: Path, array_name: str, index: int) -> int:
    value = item.get(name) if isinstance(item, dict) else None
    if not isinstance(value, int):
        raise MalformedJSONError(
            f"Item {index} of {array_name!r} in {path} has no integer {name!r}: {str(item)[:200]}"
        )
    return value


def str_field(item: Any, name: str, path: Path, array_name: str, index: int) -> str:
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


class CaptionIndex:
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
                file_images.append(int_field(item, "id", path, key, len(file_images)))
            else:
                index = len(self._image_ids) - first_annotation
                caption = str_field(item, "caption", path, key, index)
                self._image_ids.append(int_field(item, "image_id", path, key, index))
                self._annotation_ids.append(int_field(item, "id", path, key, index))
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


class CategoryLabels:
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
                file_images.append(int_field(item, "id", path, key, len(file_images)))
            elif key == "annotations" and is_item:
                index = len(annotation_ids)
                self._pairs_image.append(int_field(item, "image_id", path, key, index))
                self._pairs_category.append(int_field(item, "category_id", path, key, index))
                annotation_ids.append(item["id"] if isinstance(item.get("id"), int) else -1)
            elif key == "categories":
                categories = item
        _require_arrays(path, seen, ("images", "annotations", "categories"), "instances")
        if not isinstance(categories, list):
            raise MalformedJSONError(f"'categories' in {path} is not an array.")
        category_ids = np.sort([int_field(c, "id", path, "categories", i) for i, c in enumerate(categories)])
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


__all__ = ["NUM_COCO_CATEGORIES", "CaptionIndex", "CategoryLabels"]
