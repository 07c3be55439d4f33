"""Helpers shared by the dataset builders: input checks, Arrow batching, cache keys."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from hf_pcme.registry import check_choice

logger = logging.getLogger("hf_pcme.data")

MISSING_IMAGE_POLICIES = ("error", "skip", "unchecked")
ROWS_PER_ARROW_BATCH = 1000


def require_dir(path: str | os.PathLike, what: str, layout: str) -> Path:
    """Return ``path`` if it is a directory, else raise ``FileNotFoundError`` showing the expected layout."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} is not a directory.\nExpected layout:\n{layout}")
    return path


def require_file(path: str | os.PathLike, what: str, layout: str) -> Path:
    """Return ``path`` if it is a file, else raise ``FileNotFoundError`` showing the expected layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} does not exist.\nExpected layout:\n{layout}")
    return path


def file_signature(paths: Iterable[str | os.PathLike]) -> str:
    """A short digest of the sizes and modification times of ``paths``.

    Part of the cache key, so that editing an annotation file rebuilds the Arrow cache instead of
    silently serving stale data.
    """
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def code_hash(*module_files: str) -> str:
    """A digest of the builder's source files: changing the code invalidates the Arrow cache."""
    digest = hashlib.sha256()
    for module_file in (*module_files, __file__):
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()[:16]


class MissingFileCounter:
    """Applies a missing-file policy: raise naming the path, or count and warn once at the end."""

    def __init__(self, policy: str, what: str) -> None:
        self.policy = check_choice(policy, MISSING_IMAGE_POLICIES, "missing_images")
        self.what = what
        self.count = 0
        self.first: str | None = None

    def is_missing(self, path: str) -> bool:
        """True when ``path`` should be skipped; raises under the ``"error"`` policy."""
        if self.policy == "unchecked" or os.path.isfile(path):
            return False
        if self.policy == "error":
            raise FileNotFoundError(
                f"{self.what} missing on disk: {path}. Pass missing_images='skip' to skip such entries "
                "with a counted warning."
            )
        self.count += 1
        self.first = self.first or path
        return True

    def report(self, where: str) -> None:
        if self.count:
            logger.warning(
                "Skipped %d %s(s) missing on disk in %s (first: %s).", self.count, self.what, where, self.first
            )


class ArrowBatcher:
    """Collect rows column-wise and emit ``pyarrow`` tables matching ``features``.

    Builders yield these tables (``ArrowBasedBuilder``), which is ~10x faster than yielding one
    dict per example for the 600k COCO captions. Image columns accept what ``datasets.Image``
    accepts (a path, bytes, a PIL image); fixed-length list columns accept 1-d numpy arrays.
    """

    def __init__(self, features: datasets.Features, rows_per_batch: int = ROWS_PER_ARROW_BATCH) -> None:
        self.features = features
        self.schema = features.arrow_schema
        self.rows_per_batch = rows_per_batch
        self.columns: dict[str, list[Any]] = {name: [] for name in features}

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def add(self, row: Mapping[str, Any]) -> pa.Table | None:
        """Append ``row``; return a full table when ``rows_per_batch`` rows are waiting."""
        for name, values in self.columns.items():
            values.append(row[name])
        return self.flush() if len(self) >= self.rows_per_batch else None

    def flush(self) -> pa.Table | None:
        if not len(self):
            return None
        arrays = [self._to_arrow(name, values) for name, values in self.columns.items()]
        self.columns = {name: [] for name in self.features}
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def _to_arrow(self, name: str, values: list[Any]) -> pa.Array:
        feature = self.features[name]
        arrow_type = self.schema.field(name).type
        if isinstance(feature, datasets.Image):
            return pa.array([feature.encode_example(value) for value in values], type=arrow_type)
        if isinstance(feature, datasets.List) and feature.length > 0 and isinstance(values[0], np.ndarray):
            flat = np.concatenate(values).astype(feature.feature.pa_type.to_pandas_dtype(), copy=False)
            return pa.FixedSizeListArray.from_arrays(pa.array(flat), feature.length)
        return pa.array(values, type=arrow_type)


def build_with_cache(builder: datasets.DatasetBuilder) -> datasets.DatasetDict:
    """Prepare ``builder`` (a no-op when its Arrow cache exists) and return its memory-mapped splits."""
    builder.download_and_prepare()
    return builder.as_dataset()
