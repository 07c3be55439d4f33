"""Options of the approximate index types of :class:`~hf_pcme.index.CrossModalIndex` (``hf_pcme.index_ann``).

Choosing the options (recall is against exact search; the benchmark
``benchmarks/bench_index_ann.py`` prints recall and speed for each):

- ``nlist`` about ``sqrt(N)`` to ``4 sqrt(N)`` cells (default ``4 sqrt(N)``). More cells = fewer
  items per probed cell (faster) but more cells needed for the same recall; k-means on 1M x 1025
  vectors costs minutes, so ``train_points_per_cell`` bounds its sample.
- ``nprobe``: start at ``nlist / 64`` and double until the recall is enough; ``nprobe = nlist``
  scans everything (exact, slower than the flat index). Settable after loading (``index.nprobe``).
- ``ef_search``: at least ``candidate_factor * k``; double it until the recall is enough.
  ``hnsw_m`` 16-64 (memory about ``8 hnsw_m`` bytes per item on top of the vectors). Settable after
  loading (``index.ef_search``). Building is the slow part (single inserts, no BLAS).
- ``candidate_factor`` 2-8: more candidates lift the recall of lossy PQ codes; for IVF-Flat and
  HNSW (exact distances already) it mainly widens the search.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

#: Training points per IVF cell for k-means (FAISS wants at least 39).
IVF_TRAIN_POINTS_PER_CELL = 256
#: The approximate FAISS index types (``"flat"`` is the exact one, in ``index_backends``).
APPROXIMATE_INDEX_TYPES = ("ivf", "ivf_pq", "hnsw")


@dataclass(frozen=True)
class AnnOptions:
    """Options of the approximate index types (``nlist`` / ``nprobe`` are arguments of the index).

    Args:
        candidate_factor: candidates re-scored exactly per result, ``k' = candidate_factor * k``.
        pq_m: IVF-PQ sub-quantisers over the D embedding dims (must divide D; default: 8-dim
            sub-vectors, or the largest divisor of D below D / 8).
        pq_bits: bits per IVF-PQ sub-quantiser code (1-16; 8 = one byte).
        hnsw_m: HNSW links per node.
        ef_construction: HNSW beam width while building.
        ef_search: HNSW beam width while searching (raised to ``k'`` when smaller).
        train_points_per_cell: k-means sample per centroid, for the IVF cells and the PQ codebooks
            (FAISS wants at least 39).
    """

    candidate_factor: int = 4
    pq_m: int | None = None
    pq_bits: int = 8
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 64
    train_points_per_cell: int = IVF_TRAIN_POINTS_PER_CELL

    def __post_init__(self) -> None:
        for name, low in (("candidate_factor", 1), ("hnsw_m", 2), ("ef_construction", 1), ("ef_search", 1)):
            _check_int(getattr(self, name), name, low)
        _check_int(self.train_points_per_cell, "train_points_per_cell", 1)
        _check_int(self.pq_bits, "pq_bits", 1)
        if self.pq_bits > 16:
            raise ValueError(f"pq_bits must be between 1 and 16 (bits per sub-quantiser code), got {self.pq_bits}.")
        if self.pq_m is not None:
            _check_int(self.pq_m, "pq_m", 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "AnnOptions":
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in (values or {}).items() if key in known})

    def resolved_pq_m(self, embed_dim: int) -> int:
        """``pq_m``, or its default for ``embed_dim``; a ``ValueError`` names ``pq_m`` if it does not divide D."""
        if self.pq_m is None:
            return next(m for m in range(max(1, embed_dim // 8), 0, -1) if embed_dim % m == 0)
        if embed_dim % self.pq_m:
            raise ValueError(
                f"pq_m={self.pq_m} does not divide the embedding size D={embed_dim}: IVF-PQ splits each vector "
                f"into pq_m equal sub-vectors. Use a divisor of {embed_dim}."
            )
        return self.pq_m


def _check_int(value: Any, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


def default_nlist(num_rows: int) -> int:
    """``4 sqrt(N)`` cells (at most one per vector)."""
    return max(1, min(num_rows, int(4 * math.sqrt(num_rows))))


def check_nlist(nlist: int | None, num_rows: int) -> int:
    """``nlist`` (default :func:`default_nlist`), or a ``ValueError`` naming it if it is out of range."""
    if nlist is None:
        return default_nlist(num_rows)
    _check_int(nlist, "nlist", 1)
    if nlist > num_rows:
        raise ValueError(f"nlist={nlist} is larger than the number of vectors ({num_rows}): use a smaller nlist.")
    return nlist


def train_sample_size(index_type: str, nlist: int | None, options: AnnOptions, num_items: int, num_embeds: int) -> int:
    """Items in the k-means sample: ``train_points_per_cell`` per cell, and enough for the PQ codebooks."""
    if index_type == "hnsw":
        return 0
    points = options.train_points_per_cell * nlist
    if index_type == "ivf_pq":
        points = max(points, 64 * 2**options.pq_bits)
    return min(num_items, max(points // num_embeds, 1))


class ApproximateSearchSettings:
    """``nprobe``, ``ef_search`` and ``candidate_factor`` as attributes that can be set at any time.

    Mixed into :class:`~hf_pcme.index.CrossModalIndex`; pushes each value into its back end
    (anything with ``set_nprobe`` / ``set_ef_search`` / ``options``: ``index_ann.ApproximateBackend``).
    """

    _searcher: Any
    ann_options: AnnOptions

    @property
    def nprobe(self) -> int:
        """IVF cells scanned per query (``"ivf"`` / ``"ivf_pq"``); ``nprobe >= nlist`` scans them all."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        _check_int(value, "nprobe", 1)
        self._nprobe = value
        if hasattr(self._searcher, "set_nprobe"):
            self._searcher.set_nprobe(value)

    @property
    def ef_search(self) -> int:
        """HNSW search beam (``"hnsw"``; at least ``candidate_factor * top_k`` is used)."""
        return self.ann_options.ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._set_ann_option(ef_search=value)
        if hasattr(self._searcher, "set_ef_search"):
            self._searcher.set_ef_search(value)

    @property
    def candidate_factor(self) -> int:
        """Candidates re-scored exactly per result by the approximate types (``k' = candidate_factor * k``)."""
        return self.ann_options.candidate_factor

    @candidate_factor.setter
    def candidate_factor(self, value: int) -> None:
        self._set_ann_option(candidate_factor=value)

    def _set_ann_option(self, **values: int) -> None:
        self.ann_options = replace(self.ann_options, **values)  # validates, naming the option
        if hasattr(self._searcher, "options"):
            self._searcher.options = self.ann_options


__all__ = ["APPROXIMATE_INDEX_TYPES", "AnnOptions", "ApproximateSearchSettings", "check_nlist", "default_nlist"]
