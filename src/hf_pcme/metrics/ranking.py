"""Rank statistics of one block of query rows, exactly, without sorting the rows.

Every metric of :mod:`hf_pcme.metrics.retrieval` is a function of a few *order statistics* of
each query's score row: the rank of the best relevant item (Recall@K), the ``R`` best items
(R-Precision, MAP@R) and, for PMRP, how many plausible items sit in the top ``R``, where ``R``
can be half the gallery. A full sort costs ~10x the matrix product that produced the scores, so
:func:`rank_block` uses *histogram selection*:

1. every score of a row is mapped linearly to one of ``B`` buckets between the row's min and max
   (monotone: a higher score never lands in a lower bucket; equal scores share a bucket);
2. one ``bincount`` counts every ``(row, column group, plausibility level, bucket)``;
3. cumulative counts give the bucket holding the R-th best item, for every ``R`` needed;
4. only the items of those few buckets (and of the top buckets holding the K / R best items)
   are extracted and resolved exactly.

The exact work is done on ~1 % of the scores. A second *view* restricted to a column range
(a 1K fold) shares all the passes: its columns form a separate column group of the histogram.

Two implementations of these steps give the same results:

- on CPU, when every relevance notion is an equality of keys (the pairs, classes),
  :mod:`hf_pcme.metrics.rank_kernel` runs them per row in one compiled (numba) loop: about
  2.5-3 ns per score on one core, 2-2.7x faster than the torch ops;
- otherwise (GPU, explicit positives, numba missing, ``USE_KERNEL = False``), about ten vectorised
  torch passes per score and a few segmented sorts (:mod:`hf_pcme.metrics.rank_torch`).

Threads: ``evaluate_retrieval`` runs the blocks on worker threads, torch limited to one CPU
thread (:func:`single_cpu_thread`): the passes are memory bound, and on a shared machine a
two-thread element-wise op waits for the busier core (measured 15-50x slower than one thread).
The compiled kernel releases the GIL, so its calls run in parallel too.

Ties (documented rule, used by every metric): among items with *equal* scores, the items that
are not relevant for the metric at hand are ranked first ("pessimistic"). A relevant item's rank
is ``1 + #{irrelevant items scoring >= it} + #{relevant items scoring > it}``. The rule is
deterministic, independent of the order of the items, and gives a constant scorer no credit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..cpu_threads import single_cpu_thread
from . import rank_kernel
from .rank_torch import rank_block_torch, row_range
from .rank_types import BlockRanks, PlausibilityLevels, RelevanceTest, RelevanceView, Workspace

__all__ = [
    "BlockRanks", "PlausibilityLevels", "RelevanceTest", "RelevanceView", "USE_KERNEL", "Workspace", "num_buckets",
    "rank_block", "single_cpu_thread",
]  # fmt: skip


#: Rank CPU blocks with the compiled kernel when it applies (tests switch it off to check the torch path).
USE_KERNEL = True


def num_buckets(num_items: int) -> int:
    """Buckets per row: about 40 items per bucket, a power of two in ``[16, 1024]``.

    Fewer buckets make the histogram cheaper to accumulate; more make the extracted buckets smaller.
    """
    return int(2 ** min(10, max(4, round(math.log2(max(num_items, 1) / 40)))))


def rank_block(
    scores: torch.Tensor,
    *,
    ks: Sequence[int],
    relevance: dict[str, RelevanceView],
    plausibility: PlausibilityLevels | None = None,
    zetas: Sequence[int] = (),
    fold_columns: tuple[int, int] | None = None,
    fold_relevance: dict[str, RelevanceView] | None = None,
    workspace: Workspace | None = None,
) -> tuple[BlockRanks, BlockRanks | None]:
    """Recall@K, R-Precision, MAP@R and PMRP of every row of a score block, exactly.

    Args:
        scores: ``(r, n)`` finite scores (query rows x gallery items; higher = better).
        ks: the K of Recall@K.
        relevance: relevance notions (e.g. ``"pairs"``, ``"positives"``) over all ``n`` items;
            for each: Recall@K, R-Precision and MAP@R.
        plausibility: item levels for PMRP, or ``None``.
        zetas: Hamming thresholds of PMRP (each ``<= plausibility.max_zeta``).
        fold_columns: ``(start, end)``: also rank every row among these columns only (a 1K fold),
            sharing all the passes over the block.
        fold_relevance: the relevance notions counted inside the fold (same names).
        workspace: reusable buffers (pass the same one to consecutive calls).

    Returns:
        ``(all columns, fold or None)`` per-row results.

    Definitions (per query; ``R`` = number of relevant or plausible items; ranks follow the tie
    rule of this module):
        Recall@K = 1 if the best relevant item has rank <= K.
        R-Precision = |top-R ∩ relevant| / R.
        MAP@R = (1/R) sum_{i=1..R} P(i) rel(i), P(i) = precision of the top i
        (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020).
        PMRP_zeta = R-Precision where relevant = Hamming(labels) <= zeta, ranking only the
        labelled items (Chun et al., CVPR 2021).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (queries, items), got shape {tuple(scores.shape)}.")
    views = [relevance] + ([fold_relevance] if fold_columns is not None else [])
    ks, zetas = tuple(int(k) for k in ks), tuple(zetas)
    buckets = num_buckets(scores.shape[1])  # looked up here: tests vary it for both paths
    if _kernel_applies(scores, views):
        results = _rank_block_kernel(scores, ks, views, plausibility, zetas, fold_columns, buckets)
    else:
        results = rank_block_torch(
            scores, ks, views, plausibility, zetas, fold_columns, buckets, workspace or Workspace()
        )
    return results[0], (results[1] if fold_columns is not None else None)


# ---------------------------------------------------------------------------- compiled CPU kernel
def _kernel_applies(scores: torch.Tensor, views: list[dict[str, RelevanceView]]) -> bool:
    return (
        USE_KERNEL
        and scores.device.type == "cpu"
        and scores.dtype in (torch.float32, torch.float64)
        and rank_kernel.available()
        and all(view.keys is not None for group in views for view in group.values())
    )


def _rank_block_kernel(scores, ks, views, plausibility, zetas, fold_columns, buckets) -> list[BlockRanks]:
    """:func:`rank_block` by :func:`hf_pcme.metrics.rank_kernel.rank_rows` (same results, same rules)."""
    r, n = scores.shape
    names = list(views[0])
    item_keys = np.stack([views[0][name].keys[0].long().numpy() for name in names])
    query_keys = np.stack([views[0][name].keys[1].long().numpy() for name in names])
    counts = np.stack([np.stack([group[name].counts.long().numpy() for group in views]) for name in names])
    if plausibility is not None:
        levels = plausibility.levels.to(torch.int8).contiguous().numpy()
        level_row = plausibility.row_index if plausibility.row_index is not None else torch.arange(r)
        group = plausibility.group_size
        num_levels, considered = plausibility.num_levels, plausibility.considered
        has_labels = plausibility.query_has_labels.numpy()
    else:
        levels, level_row, group = np.zeros((1, n), np.int8), torch.zeros(r, dtype=torch.long), 1
        num_levels, considered, has_labels = 1, 0, np.zeros(r, np.bool_)
    scores = scores.contiguous()
    lows, highs = row_range(scores)
    out = rank_kernel.rank_rows(
        scores.numpy(),
        lows=lows.numpy(),
        highs=highs.numpy(),
        levels=levels,
        level_row=level_row.long().numpy(),
        group=int(group),
        num_levels=num_levels,
        considered=considered,
        zetas=np.asarray(zetas, np.int64),
        has_labels=has_labels,
        fold=fold_columns,
        item_keys=item_keys,
        query_keys=query_keys,
        relevant_counts=counts,
        ks=np.asarray(ks, np.int64),
        buckets=buckets,
    )
    return _kernel_results(out, names, views, plausibility is not None)


def _kernel_results(out: dict[str, np.ndarray], names: list[str], views, with_pmrp: bool) -> list[BlockRanks]:
    """The kernel's arrays as one :class:`BlockRanks` per view."""
    results = []
    for view_index, group_views in enumerate(views):
        result = BlockRanks()
        for index, name in enumerate(names):
            result.recall_hits[name] = torch.from_numpy(out["recall_hits"][index, view_index])
            result.r_precision[name] = torch.from_numpy(out["r_precision"][index, view_index])
            result.ap_at_r[name] = torch.from_numpy(out["ap_at_r"][index, view_index])
            result.valid[name] = group_views[name].counts > 0
        if with_pmrp:
            result.pmrp = torch.from_numpy(out["pmrp"][view_index])
            result.pmrp_valid = torch.from_numpy(out["pmrp_valid"][view_index])
        results.append(result)
    return results
