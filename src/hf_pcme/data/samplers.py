"""Class-balanced batches for CUB: one caption per class per (global) batch, as in the PCME recipe.

On CUB, two captions of the same class in one batch would count as negatives although they
describe the same kind of bird, so the original recipe fills every batch with distinct classes.
With several processes the loss sees the gathered global batch, so the classes must be distinct
over the global batch: the sampler draws global batches of ``batch_size * num_replicas`` distinct
classes and gives process ``r`` the ``r``-th slice.

Two ways to run it distributed:

* **accelerate** (``accelerator.prepare(DataLoader(ds, batch_sampler=sampler))``): build the
  sampler with ``num_replicas=accelerator.num_processes`` and ``rank=None``. It then yields each
  global batch as ``num_replicas`` consecutive slices; accelerate's ``BatchSamplerShard`` (default
  ``split_batches=False``) hands batch ``k`` to process ``k % num_processes``, i.e. exactly slice
  ``r`` of every global batch to process ``r``. accelerate calls ``set_epoch`` on
  ``batch_sampler.batch_sampler.sampler`` at each epoch, which is why the sampler exposes itself
  as ``.sampler``. (With ``split_batches=True`` use ``num_replicas=1`` and the global batch size.)
* **plain torch.distributed**: pass ``rank=torch.distributed.get_rank()``; only that slice is yielded.

Every process must use the same ``seed``; call ``set_epoch`` before each epoch (accelerate does).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` dataset rows whose classes are distinct over each global batch.

    Args:
        class_ids: class of every dataset row (e.g. ``dataset["label"]``).
        batch_size: rows per process per step.
        seed: shared by all processes; batches depend only on (seed, epoch).
        num_replicas: processes sharing a global batch of ``batch_size * num_replicas`` classes.
        rank: yield only this process's slice; ``None`` yields all slices in turn (for accelerate).
        num_batches: global batches per epoch; default ``len(class_ids) // (batch_size * num_replicas)``,
            about one caption per row per epoch.

    Within an epoch every class's rows are visited in a random order before any repeats, so
    all captions are used; the classes of each global batch are a uniform random subset.
    """

    def __init__(self, class_ids: Sequence[int] | np.ndarray, batch_size: int, *, seed: int = 0,
                 num_replicas: int = 1, rank: int | None = None, num_batches: int | None = None) -> None:
        super().__init__()
        class_ids = np.asarray(class_ids)
        if class_ids.ndim != 1 or len(class_ids) == 0:
            raise ValueError("`class_ids` must be a non-empty 1-d sequence (one class per dataset row).")
        if num_replicas < 1:
            raise ValueError(f"`num_replicas` must be >= 1; got {num_replicas}.")
        if rank is not None and not 0 <= rank < num_replicas:
            raise ValueError(f"`rank` must be in [0, {num_replicas}); got {rank}.")
        classes, inverse = np.unique(class_ids, return_inverse=True)
        global_batch = batch_size * num_replicas
        if batch_size < 1 or global_batch > len(classes):
            raise ValueError(
                f"`batch_size` * `num_replicas` = {global_batch} must be between 1 and the number of classes "
                f"({len(classes)}): a global batch holds one caption per class."
            )
        self.batch_size = batch_size
        self.drop_last = True  # every batch is full; accelerate reads this attribute
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.num_batches = num_batches if num_batches is not None else max(1, len(class_ids) // global_batch)
        if self.num_batches < 1:
            raise ValueError(f"`num_batches` must be >= 1; got {num_batches}.")
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(classes) + 1))
        self.rows_of_class = [order[bounds[c] : bounds[c + 1]] for c in range(len(classes))]
        self.epoch = 0

    @property
    def sampler(self) -> ClassBalancedBatchSampler:
        """Self: accelerate forwards ``set_epoch`` to ``batch_sampler.batch_sampler.sampler``."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_batches(self) -> Iterator[list[int]]:
        """The epoch's global batches (``batch_size * num_replicas`` rows of distinct classes)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        queues = [rng.permutation(rows) for rows in self.rows_of_class]
        positions = [0] * len(queues)
        size = self.batch_size * self.num_replicas
        for _ in range(self.num_batches):
            batch = []
            for c in rng.choice(len(queues), size=size, replace=False):
                if positions[c] == len(queues[c]):  # class exhausted: start a new random pass
                    queues[c], positions[c] = rng.permutation(self.rows_of_class[c]), 0
                batch.append(int(queues[c][positions[c]]))
                positions[c] += 1
            yield batch

    def __iter__(self) -> Iterator[list[int]]:
        replicas = range(self.num_replicas) if self.rank is None else (self.rank,)
        for batch in self.global_batches():
            for r in replicas:
                yield batch[r * self.batch_size : (r + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.num_batches * (self.num_replicas if self.rank is None else 1)
