"""The data passed between the retrieval metrics and the ranking of a score block.

:class:`RelevanceView` and :class:`PlausibilityLevels` describe a block's relevant and plausible
items (built by :mod:`hf_pcme.metrics.relevance` and :mod:`hf_pcme.metrics.plausibility`);
:class:`BlockRanks` holds the per-row metrics (:func:`hf_pcme.metrics.ranking.rank_block`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

#: Relevance test of extracted items: ``(local_rows, block_columns) -> bool`` of the same shape.
RelevanceTest = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class RelevanceView:
    """One notion of relevance seen from a block of query rows, inside one view.

    Args:
        counts: ``(r,)`` int64, number of relevant items of each query row in the view (``R``);
            rows with 0 are not scored.
        is_relevant: relevance of ``(local_row, block_column)`` pairs.
        keys: optional ``(item_keys, query_keys)``, ``(n,)`` and ``(r,)`` int64, when relevance is
            the equality ``item_keys[column] == query_keys[row]`` (pairs, classes): lets the
            compiled CPU kernel (:mod:`hf_pcme.metrics.rank_kernel`) rank the block.
    """

    counts: torch.Tensor
    is_relevant: RelevanceTest
    keys: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class PlausibilityLevels:
    """Plausibility levels of the items of a block, for PMRP.

    ``level = min(Hamming distance, max_zeta + 1)`` for an item with labels (``0`` = exactly the
    query's labels) and ``max_zeta + 2`` for an item without labels, which PMRP leaves out of the
    ranking. Item ``j`` of the block has the level ``levels[row_index[row], j // group_size]``, so
    the ``c`` captions of an image share one entry.

    Args:
        levels: ``(r, n // group_size)`` integer tensor.
        group_size: items per entry of ``levels``.
        max_zeta: the largest Hamming threshold asked for.
        query_has_labels: ``(r,)`` bool; queries without labels are not scored.
        row_index: ``(r,)`` row of ``levels`` of each query row, or ``None`` (one row each); lets
            the captions of one image share a row of the table.
    """

    levels: torch.Tensor
    group_size: int
    max_zeta: int
    query_has_labels: torch.Tensor
    row_index: torch.Tensor | None = None

    @property
    def num_levels(self) -> int:
        """Distinct levels: ``0 .. max_zeta + 1`` (labelled) and ``max_zeta + 2`` (unlabelled)."""
        return self.max_zeta + 3

    @property
    def considered(self) -> int:
        """The last level of a labelled item: levels up to this one are ranked by PMRP."""
        return self.max_zeta + 1


@dataclass
class BlockRanks:
    """Per-row results of one view of :func:`rank_block` (``r`` query rows).

    Attributes:
        recall_hits: relevance name -> ``(r, len(ks))`` bool, the best relevant item is in the top K.
        r_precision: name -> ``(r,)`` float64, ``|top-R ∩ relevant| / R``.
        ap_at_r: name -> ``(r,)`` float64, ``(1/R) sum_{i <= R} P(i) rel(i)``.
        valid: name -> ``(r,)`` bool, rows with ``R > 0`` (the others are skipped).
        pmrp: ``(r, len(zetas))`` float64 or ``None``.
        pmrp_valid: ``(r, len(zetas))`` bool or ``None``: labelled query with a plausible item.
    """

    recall_hits: dict[str, torch.Tensor] = field(default_factory=dict)
    r_precision: dict[str, torch.Tensor] = field(default_factory=dict)
    ap_at_r: dict[str, torch.Tensor] = field(default_factory=dict)
    valid: dict[str, torch.Tensor] = field(default_factory=dict)
    pmrp: torch.Tensor | None = None
    pmrp_valid: torch.Tensor | None = None


class Workspace:
    """Reusable flat buffers for the element-wise passes (no allocation, hence no page faults, per block)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel]
