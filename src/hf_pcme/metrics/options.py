"""The protocol options of :func:`hf_pcme.metrics.evaluate_retrieval`, as one object."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from .layout import check_int_tuple
from .plausibility import MAX_ZETA

PROTOCOLS = (None, "coco", "eccv_caption", "cxc")
#: Default budget of the held score matrix (1 GiB): COCO 5K (5,000 x 25,000 float32, 500 MB) fits.
DEFAULT_MAX_MEMORY = 1 << 30


@dataclass(frozen=True)
class RetrievalOptions:
    """How the metrics are computed and reported; the data and the scores are given separately.

    Args:
        protocol: ``None``, ``"coco"`` (adds the ``1k/`` keys), ``"eccv_caption"`` or ``"cxc"``.
        fold_size: images per fold of the 1K protocol (1000 for COCO).
        zetas: Hamming thresholds of PMRP.
        ks: the K of Recall@K.
        chunk_size: query rows per score block (``None``: ~16M scores per chunk on CPU, ~32M on GPU).
        num_workers: threads that score and rank chunks (``None``: torch's threads, at most 8, on
            CPU; 1 on GPU).
        max_memory: bytes the whole ``(num_images, num_texts)`` score matrix may take: if it fits,
            it is computed once (one product) and both directions are ranked from it; otherwise
            the scores are computed twice, once per direction (two passes), as blocks of rows.
            Same results either way.
    """

    protocol: str | None = None
    fold_size: int = 1000
    zetas: Sequence[int] = (0, 1, 2)
    ks: Sequence[int] = (1, 5, 10)
    chunk_size: int | None = None
    num_workers: int | None = None
    max_memory: int = DEFAULT_MAX_MEMORY

    def __post_init__(self) -> None:
        if self.protocol in ("eccv_caption", "cxc"):  # checked by evaluate_eccv_caption, which calls back
            return
        # frozen: the normalised values are set through object.__setattr__
        object.__setattr__(self, "ks", check_int_tuple(self.ks, "ks", 1))
        object.__setattr__(self, "zetas", check_int_tuple(self.zetas, "zetas", 0))
        if max(self.zetas) > MAX_ZETA:
            raise ValueError(
                f"zetas are Hamming distances between label vectors, at most {MAX_ZETA} here; got {self.zetas}."
            )
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}.")
        if self.chunk_size is not None and int(self.chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1 query rows, got {self.chunk_size}.")
        if self.max_memory is None or int(self.max_memory) < 0:
            raise ValueError(
                f"max_memory must be a number of bytes >= 0 (0 = never hold the score matrix), got {self.max_memory!r}."
            )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The keyword names of the options (as in :func:`hf_pcme.metrics.evaluate_retrieval`)."""
        return tuple(field.name for field in dataclasses.fields(cls))
