"""Training and evaluation inputs of a recipe: datasets, resumable samplers, seeded augmentation.

Resuming must replay exactly the batches an uninterrupted run would have seen. Two things make
that hold here, whatever the number of processes or data workers:

- the order of rows is a pure function of ``(seed, epoch)`` (:class:`EpochShuffleSampler`, or the
  CUB :class:`~hf_pcme.data.ClassBalancedBatchSampler`), so a resumed run re-creates the epoch
  and skips the batches already done (``accelerator.skip_first_batches``);
- the random augmentation of a row is a pure function of ``(seed, epoch, row index)``
  (:class:`TrainingRows` seeds one generator per row) rather than of the global RNG, which the
  data loader's look-ahead and worker processes would otherwise consume in a run-dependent order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, Sampler
from tqdm.auto import tqdm

from .config import Recipe

logger = logging.getLogger(__name__)


#: Columns of a caption-level split that training uses (inputs, positives, CUB classes).
TRAINING_COLUMNS = ("image", "caption", "image_id", "caption_id", "label")


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (numpy's ``SeedSequence`` hashing: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)


class EpochShuffleSampler(Sampler[int]):
    """A fresh random permutation of ``range(num_rows)`` each epoch, fixed by ``(seed, epoch)``."""

    def __init__(self, num_rows: int, seed: int = 0):
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}.")
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.num_rows, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_rows


class PixelCache:
    """The ``pixel_values`` of every distinct image of a split, computed once and kept in memory.

    With a deterministic transform (no augmentation), every caption row of an image gets the same
    tensor in every epoch; decoding and processing it once per image instead of once per row and
    epoch changes nothing but speed (on shapes, with five captions per image, the image processor
    was most of the training loop's overhead). Rows are found by ``image_id``.

    Build it with :meth:`build`, which returns ``None`` when the tensors would take more than
    ``max_bytes`` (then :class:`TrainingRows` processes images on the fly, as without a cache).
    """

    def __init__(self, image_ids: np.ndarray, pixel_values: torch.Tensor):
        order = np.argsort(image_ids, kind="stable")
        self.sorted_ids = np.asarray(image_ids)[order]
        self.order = order
        self.pixel_values = pixel_values

    @classmethod
    def build(
        cls,
        dataset: Any,
        transform: Callable[[dict], dict],
        max_bytes: float,
        batch_size: int = 256,
        progress: bool = True,
    ) -> "PixelCache | None":
        """Process the first row of each distinct ``image_id`` of ``dataset`` with ``transform``."""
        if len(dataset) == 0:
            return None
        image_ids = np.asarray(dataset.select_columns(["image_id"]).with_format("numpy")["image_id"])
        unique_ids, first_rows = np.unique(image_ids, return_index=True)
        images = dataset.select_columns(["image"])
        first = transform(images[[int(first_rows[0])]])["pixel_values"][0]
        needed = len(unique_ids) * first.numel() * first.element_size()
        if needed > max_bytes:
            logger.info("Not caching pixel values: %d images would take %.2f GiB (limit %.2f GiB).",
                        len(unique_ids), needed / 2**30, max_bytes / 2**30)
            return None
        pixel_values = torch.empty((len(unique_ids), *first.shape), dtype=first.dtype)
        starts = range(0, len(unique_ids), batch_size)
        for start in tqdm(starts, desc="Caching pixel values", unit="batch", disable=None if progress else True):
            rows = images[[int(i) for i in first_rows[start : start + batch_size]]]
            pixel_values[start : start + batch_size] = torch.stack(transform(rows)["pixel_values"])
        return cls(unique_ids, pixel_values)

    def __len__(self) -> int:
        return len(self.sorted_ids)

    def lookup(self, image_ids: Sequence[int]) -> torch.Tensor:
        """``(len(image_ids), C, H, W)``: the cached tensors of these images, in this order."""
        image_ids = np.asarray(image_ids)
        positions = np.searchsorted(self.sorted_ids, image_ids).clip(max=len(self.sorted_ids) - 1)
        missing = self.sorted_ids[positions] != image_ids
        if missing.any():
            raise KeyError(f"image ids {image_ids[missing][:5].tolist()} are not in the pixel cache.")
        return self.pixel_values[torch.from_numpy(self.order[positions])]


class TrainingRows(Dataset):
    """Rows of a ``datasets.Dataset`` turned into model-ready rows (``pixel_values`` + the other columns).

    Args:
        dataset: caption-level rows with an ``image`` column.
        transform: batch transform without randomness (e.g. ``make_eval_transform(processor)``),
            used when ``augment`` is ``None``.
        augment: ``generator -> batch transform``: the random training transform for one row,
            built with a generator seeded by ``(seed, epoch, row index)``.
        seed: the recipe seed.
        pixel_cache: the output of ``transform`` for every image of ``dataset`` (only without
            ``augment``): rows then take their pixels from it and images are not decoded.
    """

    def __init__(
        self,
        dataset: Any,
        transform: Callable[[dict], dict],
        augment: Callable[[torch.Generator], Callable[[dict], dict]] | None = None,
        seed: int = 0,
        pixel_cache: PixelCache | None = None,
    ):
        if pixel_cache is not None and augment is not None:
            raise ValueError("A pixel cache holds one fixed tensor per image; it cannot be combined with augmentation.")
        self.dataset = dataset
        self.transform = transform
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.pixel_cache = pixel_cache
        # Without the image column, reading a row decodes no image.
        self._rows_without_images = dataset.remove_columns("image") if pixel_cache is not None else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        indices = [int(i) for i in indices]
        if self.pixel_cache is not None:
            batch = self._rows_without_images[indices]
            batch["pixel_values"] = list(self.pixel_cache.lookup(batch["image_id"]))
        elif self.augment is None:
            batch = self.transform(self.dataset[indices])
        else:
            rows = self.dataset[indices]
            pieces = []
            for position, index in enumerate(indices):
                generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, index))
                pieces.append(self.augment(generator)({key: [values[position]] for key, values in rows.items()}))
            batch = {key: [value for piece in pieces for value in piece[key]] for key in pieces[0]}
        keys = list(batch)
        return [dict(zip(keys, values)) for values in zip(*(batch[key] for key in keys))]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]


def load_splits(recipe: Recipe) -> tuple[Any, Any | None]:
    """The training split and the evaluation split (or ``None``) named by ``recipe.data``."""
    from ..data import load_dataset_by_name

    data = recipe.data
    kwargs = dict(data.options)
    if data.data_dir is not None:
        kwargs["data_dir"] = data.data_dir
    splits = load_dataset_by_name(data.name, **kwargs)
    if data.train_split not in splits:
        raise ValueError(
            f"data.train_split {data.train_split!r} is not a split of {data.name!r}; it has: {', '.join(splits)}."
        )
    eval_split = None
    if recipe.eval.enabled:
        if data.eval_split not in splits:
            raise ValueError(
                f"data.eval_split {data.eval_split!r} is not a split of {data.name!r}; it has: {', '.join(splits)}. "
                "Set eval.enabled=false to train without validation."
            )
        eval_split = splits[data.eval_split]
    return splits[data.train_split], eval_split


def make_training_rows(recipe: Recipe, dataset: Any, processor: Any, progress: bool = True) -> TrainingRows:
    """:class:`TrainingRows` with the recipe's augmentation (none for shapes, whose captions it would falsify).

    Without augmentation, the pixel values of all images are computed once (:class:`PixelCache`)
    when ``data.cache_pixel_values`` and they fit in ``data.pixel_cache_max_gb``.
    """
    from ..data import make_eval_transform, make_train_transform
    from ..data.registry import NO_GEOMETRIC_AUGMENTATION

    augment = None
    if recipe.data.augment and recipe.data.name not in NO_GEOMETRIC_AUGMENTATION:
        size = recipe.data.image_size

        def augment(generator: torch.Generator) -> Callable[[dict], dict]:
            return make_train_transform(processor, image_size=size, generator=generator)

    # Only what the loss needs: extra columns (e.g. the shapes specs, from which the collator would
    # compute a plausibility mask for every batch) cost decoding and collation time for nothing.
    dataset = dataset.select_columns([c for c in TRAINING_COLUMNS if c in dataset.column_names])
    transform = make_eval_transform(processor)
    pixel_cache = None
    if augment is None and recipe.data.cache_pixel_values:
        pixel_cache = PixelCache.build(dataset, transform, recipe.data.pixel_cache_max_gb * 2**30, progress=progress)
    return TrainingRows(dataset, transform, augment, seed=recipe.seed, pixel_cache=pixel_cache)


def make_batch_sampler(recipe: Recipe, dataset: Any) -> Sampler[list[int]]:
    """Global batches of ``train.batch_size`` rows (split over processes by accelerate's ``split_batches``)."""
    batch_size = recipe.train.batch_size
    if recipe.data.sampler == "class_balanced":
        from ..data import ClassBalancedBatchSampler

        if "label" not in dataset.column_names:
            raise ValueError(f"data.sampler 'class_balanced' needs a 'label' column; {recipe.data.name!r} has none.")
        labels = np.asarray(dataset.select_columns(["label"]).with_format("numpy")["label"])
        return ClassBalancedBatchSampler(labels, batch_size, seed=recipe.seed, num_replicas=1)
    if len(dataset) < batch_size:
        raise ValueError(
            f"train.batch_size {batch_size} is larger than the training split ({len(dataset)} rows); lower it."
        )
    return BatchSampler(EpochShuffleSampler(len(dataset), seed=recipe.seed), batch_size, drop_last=True)


def select_first_images(dataset: Any, max_images: int | None) -> Any:
    """The rows of the first ``max_images`` distinct images (in order of appearance), or ``dataset`` itself."""
    if max_images is None:
        return dataset
    image_ids = np.asarray(dataset.select_columns(["image_id"]).with_format("numpy")["image_id"])
    _, first = np.unique(image_ids, return_index=True)
    keep = image_ids[np.sort(first)[:max_images]]
    return dataset.select(np.flatnonzero(np.isin(image_ids, keep)))


__all__ = [
    "EpochShuffleSampler",
    "PixelCache",
    "TrainingRows",
    "load_splits",
    "make_batch_sampler",
    "make_training_rows",
    "mix_seed",
    "select_first_images",
]
