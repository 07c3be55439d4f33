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
  torch passes per score and a few segmented sorts (:func:`_rank_block`).

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

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from . import rank_kernel

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


#: Rank CPU blocks with the compiled kernel when it applies (tests switch it off to check the torch path).
USE_KERNEL = True


def num_buckets(num_items: int) -> int:
    """Buckets per row: about 40 items per bucket, a power of two in ``[16, 1024]``.

    Fewer buckets make the histogram cheaper to accumulate; more make the extracted buckets smaller.
    """
    return int(2 ** min(10, max(4, round(math.log2(max(num_items, 1) / 40)))))


@contextlib.contextmanager
def single_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run torch CPU ops on one thread inside the block (restored afterwards)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))  # ~3x faster than torch.nonzero on CPU
    return mask.nonzero().squeeze(1)


def _order_key(values: torch.Tensor) -> torch.Tensor:
    """int64 that sorts like ``values`` (float32), with -0.0 == +0.0; values must be finite."""
    bits = (values.float() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _segment_order(rows: torch.Tensor, values: torch.Tensor, relevant: torch.Tensor | None = None) -> torch.Tensor:
    """Permutation sorting by row, then score descending, then (ties) irrelevant before relevant."""
    if values.dtype == torch.float32:
        # one int64 sort: row (high bits) | descending score (32 bits) | relevance (1 bit)
        descending = (1 << 31) - 1 - _order_key(values)  # in [0, 2^32)
        key = (rows << 33) | (descending << 1)
        if relevant is not None:
            key |= relevant.long()
        return torch.sort(key).indices
    order = torch.arange(rows.numel(), device=rows.device)
    if relevant is not None:
        order = torch.sort(relevant.to(torch.uint8), stable=True).indices
    order = order[torch.sort(values[order], descending=True, stable=True).indices]
    return order[torch.sort(rows[order], stable=True).indices]


def _positions_in_rows(sorted_rows: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based position of each element inside its row's segment, and each row's segment start."""
    counts = torch.bincount(sorted_rows, minlength=num_rows)
    starts = torch.cumsum(counts, 0) - counts
    positions = torch.arange(sorted_rows.numel(), device=sorted_rows.device) - starts[sorted_rows] + 1
    return positions, starts


def _row_sum(rows: torch.Tensor, weights: torch.Tensor, num_rows: int) -> torch.Tensor:
    return torch.zeros(num_rows, dtype=torch.float64, device=rows.device).index_add_(0, rows, weights.double())


def _bucket_of_rank(cumulative: torch.Tensor, total: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Bucket holding the rank-th best item: the highest b with #items in buckets >= b >= rank.

    ``cumulative[q, b]`` = items in buckets <= b; #items in buckets >= b is ``total - cumulative[b - 1]``.
    """
    values = (total - rank).to(cumulative.dtype).unsqueeze(1)
    return torch.searchsorted(cumulative[:, :-1].contiguous(), values, right=True).squeeze(1)


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
    if _kernel_applies(scores, views):
        return _rank_block_kernel(scores, tuple(int(k) for k in ks), views, plausibility, tuple(zetas), fold_columns)
    return _rank_block(
        scores, tuple(int(k) for k in ks), relevance, plausibility, tuple(zetas),
        fold_columns, fold_relevance, workspace or Workspace(),
    )  # fmt: skip


def _row_range(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of every row; NaN or infinite scores are an error."""
    low = scores.amin(dim=1)
    high = scores.amax(dim=1)
    if not bool(torch.isfinite(low).all() & torch.isfinite(high).all()):
        bad = (~(torch.isfinite(low) & torch.isfinite(high))).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"scores contain NaN or infinite values (block rows {bad}); check the embeddings "
            "(NaN/inf inputs) or replace masked scores by a finite very low value."
        )
    return low, high


def _rank_block(scores, ks, relevance, plausibility, zetas, fold_columns, fold_relevance, workspace):
    device = scores.device
    r, n = scores.shape
    low, high = _row_range(scores)
    if scores.dtype != torch.float64 and not bool(torch.isfinite(high - low).all()):
        # a row's spread overflows its dtype (|scores| near the float32 limit): rank in float64
        scores, low, high = scores.double(), low.double(), high.double()
    buckets = num_buckets(n)
    num_groups = 2 if fold_columns is not None else 1
    if plausibility is not None:
        num_levels, considered = plausibility.num_levels, plausibility.considered
    else:
        num_levels, considered = 1, 0
    row_stride = num_groups * num_levels * buckets

    # bucket = floor((s - min) * B / (max - min)), in place in reusable buffers.
    spread = (high - low).double()
    scale = torch.where(spread > 0, buckets / spread.clamp_min(1e-300), torch.zeros_like(spread))
    scale = scale.clamp_max(1e30).to(scores.dtype if scores.dtype == torch.float64 else torch.float32)
    scaled = workspace.get("scaled", r * n, scale.dtype, device).view(r, n)
    torch.sub(scores, low.unsqueeze(1), out=scaled)
    scaled.mul_(scale.unsqueeze(1)).clamp_(0, buckets - 1)
    key = workspace.get("key", r * n, torch.int32, device).view(r, n)
    key.copy_(scaled)  # truncation = floor for non-negative values
    # key = row * row_stride + group * L * B + level * B + bucket
    key.add_(torch.arange(r, device=device, dtype=torch.int32).unsqueeze(1) * row_stride)
    if plausibility is None:
        if fold_columns is not None:
            key[:, fold_columns[0] : fold_columns[1]] += buckets
    else:
        group = plausibility.group_size
        table_rows, runs = plausibility.row_index, 1
        if table_rows is not None and group == 1:
            # consecutive query rows sharing a level row (the captions of one image): one bias row each
            unique_rows, counts = torch.unique_consecutive(table_rows, return_counts=True)
            if r % unique_rows.numel() == 0 and bool((counts == r // unique_rows.numel()).all()):
                table_rows, runs = unique_rows, r // unique_rows.numel()
        levels = plausibility.levels if table_rows is None else plausibility.levels[table_rows]
        bias = levels.to(torch.int32).mul_(buckets)
        if fold_columns is not None:
            bias[:, fold_columns[0] // group : fold_columns[1] // group] += num_levels * buckets
        # broadcast adds, never a gather over the block: the captions of one image share a level
        # (i2t: `group` adjacent columns; t2i: `runs` adjacent rows)
        if runs > 1:
            key.view(-1, runs, n).add_(bias.unsqueeze(1))
        else:
            key.view(r, n // group, group).add_(bias.unsqueeze(2))
    histogram = torch.bincount(key.view(-1), minlength=r * row_stride).to(torch.int32)
    histogram = histogram.view(r, num_groups, num_levels, buckets)

    # cumulative[q, g, l, b] = items of column group g in buckets <= b with level <= l (int32)
    for level in range(1, num_levels):  # prefix over the few levels: in-place adds, no strided cumsum
        histogram[:, :, level] += histogram[:, :, level - 1]
    cumulative = histogram.cumsum(3, dtype=torch.int32)
    view_cumulatives = [cumulative[:, 0] + cumulative[:, 1] if num_groups > 1 else cumulative[:, 0]]
    view_relevances = [relevance]
    if fold_columns is not None:
        view_cumulatives.append(cumulative[:, 1])
        view_relevances.append(fold_relevance)
    extract = torch.zeros((r, num_groups, num_levels, buckets), dtype=torch.bool, device=device)
    bucket_ids = torch.arange(buckets, device=device, dtype=torch.int32)
    max_k = max(ks)
    top_buckets, pmrp_plans = [], []
    if plausibility is not None:
        has_labels = plausibility.query_has_labels.to(device)
        zeta_index = torch.tensor(zetas, device=device)
    for view_index, (view_cumulative, view_relevance) in enumerate(zip(view_cumulatives, view_relevances)):
        groups = slice(None) if view_index == 0 else slice(1, 2)
        totals = view_cumulative[:, :, -1].long()
        needed = torch.full((r,), max_k, dtype=torch.int64, device=device)
        for view in view_relevance.values():
            needed = torch.maximum(needed, view.counts.to(device))
        needed = needed.clamp(min=1, max=max(int(totals[0, -1]), 1))
        top_bucket = _bucket_of_rank(view_cumulative[:, -1], totals[:, -1], needed)
        extract[:, groups] |= (bucket_ids >= top_bucket.unsqueeze(1)).view(r, 1, 1, buckets)
        top_buckets.append(top_bucket)
        if plausibility is not None:
            cum_considered = view_cumulative[:, considered]
            total_considered = totals[:, considered]
            plausible_count = totals[:, zeta_index]  # (r, Z)
            valid = has_labels.unsqueeze(1) & (plausible_count > 0)
            target = torch.stack([
                _bucket_of_rank(cum_considered, total_considered, plausible_count[:, z].clamp_min(1))
                for z in range(len(zetas))
            ], dim=1)  # fmt: skip
            target = torch.where(valid, target, torch.zeros_like(target))  # (r, Z)
            above = total_considered.unsqueeze(1) - cum_considered.gather(1, target).long()
            row_ids = torch.arange(r, device=device).unsqueeze(1)
            plausible_above = plausible_count - view_cumulative[row_ids, zeta_index.unsqueeze(0), target].long()
            # mark the target buckets (invalid rows write to a spare column that is dropped)
            marks = torch.zeros((r, buckets + 1), dtype=torch.bool, device=device)
            marks.scatter_(1, torch.where(valid, target, buckets), True)
            extract[:, groups, : considered + 1] |= marks[:, :buckets].view(r, 1, 1, buckets)
            pmrp_plans.append((valid.t(), target.t(), plausible_count.t(), above.t(), plausible_above.t()))

    hit = workspace.get("hit", r * n, torch.bool, device)
    torch.index_select(extract.view(-1), 0, key.view(-1), out=hit)
    flat = _flat_nonzero(hit).to(device)
    hit_key = key.view(-1)[flat].long()
    hit_rows = torch.div(hit_key, row_stride, rounding_mode="floor")
    hit_cols = flat - hit_rows * n
    within_row = hit_key - hit_rows * row_stride
    hit_bucket = within_row % buckets
    hit_level = torch.div(within_row, buckets, rounding_mode="floor") % num_levels
    in_fold = within_row >= num_levels * buckets
    hit_values = scores.reshape(-1)[flat] if scores.is_contiguous() else scores[hit_rows, hit_cols]

    views = len(view_relevances)
    results = [BlockRanks() for _ in range(views)]
    in_views = [None, in_fold]
    _top_results(results, r, n, ks, view_relevances, top_buckets, in_views, hit_rows, hit_cols, hit_values, hit_bucket)
    if plausibility is not None:
        _pmrp_results(results, r, zetas, considered, pmrp_plans, in_views, hit_rows, hit_values, hit_bucket, hit_level)
    return results[0], (results[1] if fold_columns is not None else None)


def _gather_segments(masks: torch.Tensor, num_rows: int, hit_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hits selected by each row of ``masks`` ``(num_masks, hits)``, and their segment ``mask_index * num_rows + row``."""
    mask_index, selected = masks.nonzero(as_tuple=True)
    return selected, hit_rows[selected] + mask_index * num_rows


def _top_results(results, r, n, ks, view_relevances, top_buckets, in_views,
                 hit_rows, hit_cols, hit_values, hit_bucket) -> None:  # fmt: skip
    """Recall@K, R-Precision and MAP@R of every view and relevance notion, in one segmented pass each."""
    device = hit_rows.device
    views = len(view_relevances)
    masks = []
    for view_index in range(views):
        mask = hit_bucket >= top_buckets[view_index][hit_rows]
        masks.append(mask if in_views[view_index] is None else mask & in_views[view_index])
    selected, segments = _gather_segments(torch.stack(masks), r, hit_rows)
    rows, cols, values = hit_rows[selected], hit_cols[selected], hit_values[selected]
    ks_tensor = torch.tensor(ks, device=device, dtype=torch.int64)
    for name in view_relevances[0]:
        counts = torch.cat([view_relevances[v][name].counts.to(device) for v in range(views)])
        relevant = view_relevances[0][name].is_relevant(rows, cols).to(torch.bool)
        order = _segment_order(segments, values, relevant)
        segments_sorted, relevant_sorted = segments[order], relevant[order]
        positions, starts = _positions_in_rows(segments_sorted, views * r)
        first = torch.full((views * r,), n + 1, dtype=torch.int64, device=device)
        first.scatter_reduce_(0, segments_sorted[relevant_sorted], positions[relevant_sorted], reduce="amin")
        relevant_count = torch.cumsum(relevant_sorted.long(), 0)
        before = torch.where(starts > 0, relevant_count[(starts - 1).clamp_min(0)], torch.zeros_like(starts))
        relevant_so_far = relevant_count - before[segments_sorted]
        counted = relevant_sorted & (positions <= counts[segments_sorted])
        denominator = counts.clamp_min(1).double()
        r_precision = _row_sum(segments_sorted, counted, views * r) / denominator
        precision = relevant_so_far.double() / positions.double()
        ap_at_r = _row_sum(segments_sorted, precision * counted, views * r) / denominator
        hits = first.unsqueeze(1) <= ks_tensor.unsqueeze(0)
        for v in range(views):
            rows_of_view = slice(v * r, (v + 1) * r)
            results[v].recall_hits[name] = hits[rows_of_view]
            results[v].r_precision[name] = r_precision[rows_of_view]
            results[v].ap_at_r[name] = ap_at_r[rows_of_view]
            results[v].valid[name] = counts[rows_of_view] > 0


def _pmrp_results(results, r, zetas, considered, pmrp_plans, in_views,
                  hit_rows, hit_values, hit_bucket, hit_level) -> None:  # fmt: skip
    """PMRP of every view and zeta in one segmented pass (segment = view, zeta, row)."""
    device = hit_rows.device
    num_zetas = len(zetas)
    labelled = hit_level <= considered
    masks, zeta_of_mask = [], []
    for view_index, (valid, target, _, _, _) in enumerate(pmrp_plans):
        # (Z, hits): the hit is in the target bucket of zeta z (invalid rows have no target)
        mask = torch.where(valid, target, -1)[:, hit_rows] == hit_bucket
        mask &= labelled
        if in_views[view_index] is not None:
            mask &= in_views[view_index]
        masks.append(mask)
        zeta_of_mask.extend(zetas)
    selected, segments = _gather_segments(torch.cat(masks), r, hit_rows)
    values, level = hit_values[selected], hit_level[selected]
    zeta = torch.tensor(zeta_of_mask, device=device)[torch.div(segments, r, rounding_mode="floor")]
    plausible_count = torch.cat([plan[2] for plan in pmrp_plans]).reshape(-1)  # per segment
    above = torch.cat([plan[3] for plan in pmrp_plans]).reshape(-1)
    plausible_above = torch.cat([plan[4] for plan in pmrp_plans]).reshape(-1)
    valid = torch.cat([plan[0] for plan in pmrp_plans]).reshape(-1)
    num_segments = len(zeta_of_mask) * r
    order = _segment_order(segments, values)
    segments_sorted, values_sorted = segments[order], values[order]
    positions, _ = _positions_in_rows(segments_sorted, num_segments)
    # threshold t = the (R - above)-th best labelled item of the target bucket
    at_threshold = positions == (plausible_count - above)[segments_sorted]
    threshold = torch.zeros(num_segments, dtype=values.dtype, device=device)
    threshold[segments_sorted[at_threshold]] = values_sorted[at_threshold]
    segment_threshold = threshold[segments]
    higher = values > segment_threshold
    more_above = _row_sum(segments, higher, num_segments)
    plausible_higher = _row_sum(segments, higher & (level <= zeta), num_segments)
    tied_implausible = _row_sum(segments, (values == segment_threshold) & (level > zeta), num_segments)
    # Top R = all items above t, then the tied items at t with the implausible ones first.
    free_slots = (plausible_count - above).double() - more_above - tied_implausible
    matched = plausible_above.double() + plausible_higher + free_slots.clamp_min(0)
    pmrp = torch.where(valid, matched / plausible_count.clamp_min(1).double(), 0.0)
    for view_index in range(len(pmrp_plans)):
        part = slice(view_index * num_zetas * r, (view_index + 1) * num_zetas * r)
        results[view_index].pmrp = pmrp[part].view(num_zetas, r).t()
        results[view_index].pmrp_valid = valid[part].view(num_zetas, r).t()


# ---------------------------------------------------------------------------- compiled CPU kernel
def _kernel_applies(scores: torch.Tensor, views: list[dict[str, RelevanceView]]) -> bool:
    return (
        USE_KERNEL
        and scores.device.type == "cpu"
        and scores.dtype in (torch.float32, torch.float64)
        and rank_kernel.available()
        and all(view.keys is not None for group in views for view in group.values())
    )


def _rank_block_kernel(scores, ks, views, plausibility, zetas, fold_columns) -> tuple[BlockRanks, BlockRanks | None]:
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
    lows, highs = _row_range(scores)
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
        buckets=num_buckets(n),
    )
    results = []
    for view_index, group_views in enumerate(views):
        result = BlockRanks()
        for index, name in enumerate(names):
            result.recall_hits[name] = torch.from_numpy(out["recall_hits"][index, view_index])
            result.r_precision[name] = torch.from_numpy(out["r_precision"][index, view_index])
            result.ap_at_r[name] = torch.from_numpy(out["ap_at_r"][index, view_index])
            result.valid[name] = group_views[name].counts > 0
        if plausibility is not None:
            result.pmrp = torch.from_numpy(out["pmrp"][view_index])
            result.pmrp_valid = torch.from_numpy(out["pmrp_valid"][view_index])
        results.append(result)
    return results[0], (results[1] if fold_columns is not None else None)
