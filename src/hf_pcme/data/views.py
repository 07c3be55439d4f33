"""Evaluation views: unique images, captions, and which image each caption belongs to.

Training iterates one row per caption. Retrieval evaluation embeds every image once and every
caption once, then needs the caption -> image mapping (ground truth) and the plausibility labels
of the dataset (COCO multi-hot categories for PMRP, CUB classes, shapes' exact plausibility).
``make_retrieval_split`` builds that view from a caption-level split without copying data: the
images dataset is a ``select`` (an index mapping) of one caption row per image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import datasets
import numpy as np

IMAGE_COLUMNS = ("image", "image_id", "labels_multi_hot", "label", "class_id", "class_name", "shapes", "num_shapes")
CAPTION_COLUMNS = ("caption", "caption_id", "image_id", "label", "specificity", "phrases", "exhaustive")


@dataclass
class RetrievalSplit:
    """One evaluation split: ``images`` (one row each), ``captions`` (one row each) and their links.

    Attributes:
        images: unique images in order of first appearance (columns from ``IMAGE_COLUMNS``).
        captions: every caption (columns from ``CAPTION_COLUMNS``).
        text_to_image: (num_captions,) int64, row in ``images`` of each caption's image.
        image_labels: (num_images, 80) int8 COCO instance-category multi-hot (PMRP), or None.
        image_classes: (num_images,) int64 class index (CUB ``label``), or None.
        caption_specificity: (num_captions,) int64 specificity level (shapes; 0 = exact), or None.
        plausibility: shapes only: ``plausibility(image_rows, caption_rows)`` -> bool array
            (len(image_rows), len(caption_rows)); True iff the caption is an exact plausible match.
    """

    images: datasets.Dataset
    captions: datasets.Dataset
    text_to_image: np.ndarray
    image_labels: np.ndarray | None = None
    image_classes: np.ndarray | None = None
    caption_specificity: np.ndarray | None = None
    plausibility: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def captions_of_image(self) -> list[np.ndarray]:
        """Caption rows of each image (the i2t ground truth), as a list of int64 arrays."""
        order = np.argsort(self.text_to_image, kind="stable")
        bounds = np.searchsorted(self.text_to_image[order], np.arange(self.num_images + 1))
        return [order[bounds[i] : bounds[i + 1]] for i in range(self.num_images)]


def column_as_numpy(dataset: datasets.Dataset, column: str) -> np.ndarray:
    """A column as a numpy array, honouring the dataset's index mapping, without decoding images."""
    # Slicing formats the whole column in one batch; indexing by name would format row by row.
    return np.asarray(dataset.select_columns([column]).with_format("numpy")[:][column])


def make_retrieval_split(dataset: datasets.Dataset) -> RetrievalSplit:
    """The evaluation view of a caption-level split of COCO, CUB or shapes (needs ``image_id``)."""
    if "image_id" not in dataset.column_names:
        raise ValueError(
            f"`dataset` needs an 'image_id' column to group captions by image; it has {dataset.column_names}."
        )
    image_ids = column_as_numpy(dataset, "image_id")
    _, first_row, inverse = np.unique(image_ids, return_index=True, return_inverse=True)
    order = np.argsort(first_row, kind="stable")  # images in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    images = dataset.select(first_row[order]).select_columns(
        [c for c in IMAGE_COLUMNS if c in dataset.column_names]
    )
    captions = dataset.select_columns([c for c in CAPTION_COLUMNS if c in dataset.column_names])
    view = RetrievalSplit(images=images, captions=captions, text_to_image=rank[inverse.reshape(-1)].astype(np.int64))
    if "labels_multi_hot" in images.column_names:
        view.image_labels = column_as_numpy(images, "labels_multi_hot").astype(np.int8)
    if "label" in images.column_names:
        view.image_classes = column_as_numpy(images, "label").astype(np.int64)
    if "specificity" in captions.column_names:
        view.caption_specificity = column_as_numpy(captions, "specificity").astype(np.int64)
    if {"shapes", "num_shapes"} <= set(images.column_names) and {"phrases", "exhaustive"} <= set(captions.column_names):
        from hf_pcme.data.shapes import ShapesPlausibility

        view.plausibility = ShapesPlausibility.from_datasets(images, captions)
    return view
