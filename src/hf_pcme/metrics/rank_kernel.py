"""The histogram selection of :mod:`hf_pcme.metrics.ranking` as one compiled pass per query row (CPU).

:func:`hf_pcme.metrics.ranking.rank_block` on CPU spends most of its time in a dozen vectorised
torch passes over each score block, plus a few segmented sorts. On CPU, this module computes the
same results (the same metrics, exactly, with the same tie rule) one row at a time in a
numba-compiled loop:

1. min and max of the row;
2. one loop over the row: the bucket ``floor((s - min) * (B - 1/2) / (max - min))`` of each score,
   its histogram bin ``(column group, plausibility level, bucket)``, and the count;
3. from the counts: the bucket holding the ``needed``-th best item of each view (top items,
   Recall@K, R-Precision, MAP@R) and the bucket holding the ``R``-th best labelled item of each
   view and zeta (PMRP);
4. a second loop keeps the items of those buckets (~1 % of the row);
5. the kept items are sorted (a few dozen per target) and resolved exactly, with the tie rule of
   :mod:`hf_pcme.metrics.ranking` (irrelevant items first among equal scores).

Steps 2 and 4 read the row in order and the histogram of one row stays in the L1/L2 cache; the
bucket computation is a separate loop so that it vectorises (measured: ~0.1 ns per score, the
counting loop ~0.5-1.3 ns). The scaling by ``B - 1/2`` keeps every bucket below ``B`` without a
clamp (the bucket edges differ from the torch path's; any monotone bucketing gives the same exact
results).

It handles relevance notions that are an equality of keys (``item_keys[col] == query_keys[row]``:
the pairs of both directions, and classes); explicit positives use the torch path. ``numba`` is a
dependency of the package; without it (or on GPU) the torch path runs, with the same results.
Compiled functions are cached on disk (``cache=True``, next to this file or in numba's user
cache): the first call in a fresh environment compiles for ~9 s per score dtype (float32, and
float64 for float64/integer score matrices), later processes load it in ~0.4 s.
"""

from __future__ import annotations

import numpy as np

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; the torch path covers its absence
    njit = None


def available() -> bool:
    """Whether the compiled kernel can run (numba importable)."""
    return njit is not None


def _sort_desc(values, flags, order, count):
    """``order[:count]`` = positions of ``values[:count]`` by value descending, then flag ascending
    (among equal values, flag 0 first); insertion sort for the usual few dozen, mergesort beyond."""
    if count > 48:
        by_flag = np.argsort(flags[:count], kind="mergesort")
        ranked = by_flag[np.argsort(-values[:count][by_flag], kind="mergesort")]
        for i in range(count):
            order[i] = ranked[i]
        return
    for i in range(count):
        j = i
        while j > 0:
            previous = order[j - 1]
            if values[previous] > values[i] or (values[previous] == values[i] and flags[previous] <= flags[i]):
                break
            order[j] = previous
            j -= 1
        order[j] = i


def _kth_largest(values, count, k):
    """The ``k``-th largest (1-based) of ``values[:count]``, reordering them (quickselect, O(count))."""
    left, right = 0, count - 1
    index = k - 1  # position of the answer in a descending order
    while left < right:
        pivot = values[(left + right) // 2]
        i, j = left, right
        while i <= j:
            while values[i] > pivot:
                i += 1
            while values[j] < pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if index <= j:
            right = j
        elif index >= i:
            left = i
        else:
            return values[index]
    return values[index]


def _rank_rows(
    scores, lows, highs, levels, level_row, group, num_levels, considered, zetas, has_labels,
    fold_start, fold_end, item_keys, query_keys, relevant_counts, ks, buckets,
    recall_hits, r_precision, ap_at_r, pmrp, pmrp_valid,
):  # fmt: skip
    """Fill the result arrays for every row of ``scores`` (see :func:`rank_rows` for the layout).

    One long function on purpose: numba compiles it as one loop nest whose scratch arrays are
    allocated once for all rows and stay in cache; splitting the per-row steps into compiled
    helpers would pass a dozen arrays per call and per row (the steps are numbered as in the
    module docstring).
    """
    num_rows, num_items = scores.shape
    num_views = 2 if fold_end >= 0 else 1
    num_names = item_keys.shape[0]
    num_zetas = zetas.shape[0]
    num_ks = ks.shape[0]
    max_k = 0
    for k in ks:
        max_k = max(max_k, k)
    per_group = num_levels * buckets
    hist = np.zeros(num_views * per_group, np.int64)
    extract = np.zeros(num_views * per_group, np.bool_)
    keys = np.empty(num_items, np.int32)
    # the kept items of a row: column, score, bucket, level, group
    hit_col = np.empty(num_items, np.int64)
    hit_value = np.empty(num_items, scores.dtype)
    hit_bucket = np.empty(num_items, np.int64)
    hit_level = np.empty(num_items, np.int64)
    hit_group = np.empty(num_items, np.int64)
    # scratch for the sorts of the resolution
    work_values = np.empty(num_items, scores.dtype)
    work_flags = np.empty(num_items, np.int64)
    work_order = np.empty(num_items, np.int64)
    select_values = np.empty(num_items, scores.dtype)
    scale_holder = np.empty(1, scores.dtype)  # the scale in the scores' precision
    top_bucket = np.zeros(num_views, np.int64)
    target = np.zeros((num_views, num_zetas), np.int64)
    plausible_total = np.zeros((num_views, num_zetas), np.int64)
    labelled_above = np.zeros((num_views, num_zetas), np.int64)
    plausible_above = np.zeros((num_views, num_zetas), np.int64)
    seen_zeta = np.zeros(num_zetas, np.int64)
    num_level_cols = num_items // group

    level_totals = np.zeros(num_views * num_levels, np.int64)
    for row in range(num_rows):
        values = scores[row]
        low = lows[row]
        # bucket = floor((s - min) * (B - 1/2) / (max - min)) in the scores' precision: monotone, in [0, B - 1]
        spread = highs[row] - low
        scale_holder[0] = (buckets - 0.5) / spread if spread > 0 else 0.0
        scale = scale_holder[0]
        if np.isfinite(spread) and np.isfinite(scale):  # (a vectorised loop; the counting loop is not)
            for j in range(num_items):
                keys[j] = np.int32((values[j] - low) * scale)
        else:  # a spread that overflows, or one so small that the scale does: float64, clamped
            low64, spread64 = np.float64(low), np.float64(highs[row]) - np.float64(low)
            for j in range(num_items):
                position = (np.float64(values[j]) - low64) / spread64 * (buckets - 0.5)
                keys[j] = np.int32(min(max(position, 0.0), buckets - 1.0)) if position == position else 0

        # pass 1: histogram of (group, level, bucket); the captions of one image share a level
        hist[:] = 0
        level_of = levels[level_row[row]]
        if group == 1:  # one level per item: vectorised adds, then a plain counting loop
            for j in range(num_items):
                keys[j] += np.int32(level_of[j]) * np.int32(buckets)
            for j in range(max(fold_start, 0), max(fold_end, 0)):
                keys[j] += np.int32(per_group)
            for j in range(num_items):
                hist[keys[j]] += 1
        else:
            for col in range(num_level_cols):
                start = col * group
                in_fold = 1 if (fold_start <= start < fold_end) else 0
                base = np.int32((in_fold * num_levels + level_of[col]) * buckets)
                for j in range(start, start + group):
                    key = keys[j] + base
                    keys[j] = key
                    hist[key] += 1
        level_totals[:] = 0
        for grp_level in range(num_views * num_levels):
            first = grp_level * buckets
            total = 0
            for bucket in range(buckets):
                total += hist[first + bucket]
            level_totals[grp_level] = total

        # targets, from the top bucket down, stopping once all are found: the bucket of the needed-th
        # best item of each view (top items), and of the R-th best labelled item per view and zeta (PMRP)
        extract[:] = False
        for view in range(num_views):
            total = 0
            for grp_level in range(view * num_levels, num_views * num_levels):
                total += level_totals[grp_level]
            wanted = max_k
            for name in range(num_names):
                wanted = max(wanted, relevant_counts[name, view, row])
            needed = max(1, min(wanted, total))
            for z in range(num_zetas):
                target[view, z] = -1
                plausible = 0
                if num_levels > 1 and has_labels[row]:
                    for grp in range(view, num_views):
                        for level in range(zetas[z] + 1):
                            plausible += level_totals[grp * num_levels + level]
                plausible_total[view, z] = plausible
            top_bucket[view] = -1
            seen_all, seen_labelled = 0, 0
            seen_zeta[:] = 0
            for bucket in range(buckets - 1, -1, -1):
                count_all, count_labelled = 0, 0
                for level in range(num_levels):
                    count = 0
                    for grp in range(view, num_views):
                        count += hist[(grp * num_levels + level) * buckets + bucket]
                    count_all += count
                    if level <= considered:
                        count_labelled += count
                missing = False
                if top_bucket[view] < 0:
                    if seen_all + count_all >= needed:
                        top_bucket[view] = bucket
                    else:
                        missing = True
                for z in range(num_zetas):
                    plausible = plausible_total[view, z]
                    if plausible == 0 or target[view, z] >= 0:
                        continue
                    if seen_labelled + count_labelled >= plausible:
                        target[view, z] = bucket
                        labelled_above[view, z] = seen_labelled
                        plausible_above[view, z] = seen_zeta[z]
                    else:
                        missing = True
                        for level in range(zetas[z] + 1):
                            for grp in range(view, num_views):
                                seen_zeta[z] += hist[(grp * num_levels + level) * buckets + bucket]
                seen_all += count_all
                seen_labelled += count_labelled
                if not missing:
                    break
            if top_bucket[view] < 0:
                top_bucket[view] = 0
            for grp in range(view, num_views):
                for level in range(num_levels):
                    first = (grp * num_levels + level) * buckets
                    for bucket in range(top_bucket[view], buckets):
                        extract[first + bucket] = True
                for z in range(num_zetas):
                    if target[view, z] >= 0:
                        for level in range(considered + 1):
                            extract[(grp * num_levels + level) * buckets + target[view, z]] = True

        # pass 2: keep the items of the marked buckets (~1 % of the row), decoded once
        num_hits = 0
        for j in range(num_items):
            key = keys[j]
            if extract[key]:
                hit_col[num_hits] = j
                hit_value[num_hits] = values[j]
                hit_bucket[num_hits] = key % buckets
                group_level = key // buckets
                hit_level[num_hits] = group_level % num_levels
                hit_group[num_hits] = group_level // num_levels
                num_hits += 1

        for view in range(num_views):
            # the top items of the view, best first; among equal scores the irrelevant ones first
            for name in range(num_names):
                count = 0
                query_key = query_keys[name, row]
                for h in range(num_hits):
                    if hit_group[h] >= view and hit_bucket[h] >= top_bucket[view]:
                        work_values[count] = hit_value[h]
                        work_flags[count] = 1 if item_keys[name, hit_col[h]] == query_key else 0
                        count += 1
                _sort_desc(work_values, work_flags, work_order, count)
                count_r = relevant_counts[name, view, row]
                first_relevant = num_items + 1
                found, precision_sum = 0, 0.0
                for position in range(count):
                    if work_flags[work_order[position]] == 1:
                        if first_relevant > num_items:
                            first_relevant = position + 1
                        if position < count_r:
                            found += 1
                            precision_sum += found / (position + 1)
                for kk in range(num_ks):
                    recall_hits[name, view, row, kk] = first_relevant <= ks[kk]
                denominator = max(count_r, 1)
                r_precision[name, view, row] = found / denominator
                ap_at_r[name, view, row] = precision_sum / denominator

            # PMRP: the (R - above)-th best labelled item of the target bucket is the threshold t;
            # the top R = the labelled items above t, then those tied at t, implausible first
            for z in range(num_zetas):
                pmrp_valid[view, row, z] = target[view, z] >= 0
                pmrp[view, row, z] = 0.0
                if target[view, z] < 0:
                    continue
                count = 0
                for h in range(num_hits):
                    if hit_group[h] >= view and hit_level[h] <= considered and hit_bucket[h] == target[view, z]:
                        work_values[count] = hit_value[h]
                        work_flags[count] = 0 if hit_level[h] <= zetas[z] else 1
                        select_values[count] = hit_value[h]
                        count += 1
                if count == 0:  # impossible by the choice of the target bucket; numba checks no bounds
                    continue
                # 1 <= need <= count by the choice of the target bucket; clamped anyway, as above
                need = min(max(plausible_total[view, z] - labelled_above[view, z], 1), count)
                threshold = _kth_largest(select_values, count, need)
                more_above, plausible_higher, tied_implausible = 0, 0, 0
                for h in range(count):
                    if work_values[h] > threshold:
                        more_above += 1
                        plausible_higher += 1 - work_flags[h]
                    elif work_values[h] == threshold:
                        tied_implausible += work_flags[h]
                free_slots = max(need - more_above - tied_implausible, 0)
                matched = plausible_above[view, z] + plausible_higher + free_slots
                pmrp[view, row, z] = matched / plausible_total[view, z]


if njit is not None:
    _sort_desc = njit(cache=True, nogil=True)(_sort_desc)
    _kth_largest = njit(cache=True, nogil=True)(_kth_largest)
    _rank_rows = njit(cache=True, nogil=True)(_rank_rows)


def rank_rows(
    scores: np.ndarray,
    *,
    lows: np.ndarray,
    highs: np.ndarray,
    levels: np.ndarray,
    level_row: np.ndarray,
    group: int,
    num_levels: int,
    considered: int,
    zetas: np.ndarray,
    has_labels: np.ndarray,
    fold: tuple[int, int] | None,
    item_keys: np.ndarray,
    query_keys: np.ndarray,
    relevant_counts: np.ndarray,
    ks: np.ndarray,
    buckets: int,
) -> dict[str, np.ndarray]:
    """Every metric of each row of ``scores`` ``(r, n)``, for 1 or 2 views (whole row, fold columns).

    Args:
        lows, highs: ``(r,)`` finite min and max of each row (in the scores' dtype).
        levels: ``(rows_of_levels, n // group)`` int8 plausibility level of each item group;
            ``level_row`` ``(r,)``: the row of ``levels`` of each query row.
        num_levels, considered: levels per item (1 without PMRP) and the last labelled level.
        zetas: ``(Z,)`` int64 Hamming thresholds; ``has_labels`` ``(r,)`` bool (PMRP queries).
        fold: column range of the fold view (group aligned), or ``None``.
        item_keys, query_keys: ``(names, n)`` and ``(names, r)`` int64: item ``j`` is relevant for
            row ``q`` under relevance notion ``name`` iff ``item_keys[name, j] == query_keys[name, q]``.
        relevant_counts: ``(names, views, r)`` int64, relevant items of each row in each view (R).
        ks: ``(K,)`` int64.  buckets: histogram buckets per (group, level).

    Returns:
        ``recall_hits`` ``(names, views, r, K)``, ``r_precision`` / ``ap_at_r`` ``(names, views, r)``,
        ``pmrp`` / ``pmrp_valid`` ``(views, r, Z)``.
    """
    num_rows = scores.shape[0]
    num_views = 2 if fold is not None else 1
    names = item_keys.shape[0]
    out = {
        "recall_hits": np.zeros((names, num_views, num_rows, ks.shape[0]), np.bool_),
        "r_precision": np.zeros((names, num_views, num_rows), np.float64),
        "ap_at_r": np.zeros((names, num_views, num_rows), np.float64),
        "pmrp": np.zeros((num_views, num_rows, zetas.shape[0]), np.float64),
        "pmrp_valid": np.zeros((num_views, num_rows, zetas.shape[0]), np.bool_),
    }
    fold_start, fold_end = fold if fold is not None else (-1, -1)
    _rank_rows(
        scores, lows, highs, levels, level_row, group, num_levels, considered, zetas, has_labels,
        fold_start, fold_end, item_keys, query_keys, relevant_counts, ks, buckets,
        out["recall_hits"], out["r_precision"], out["ap_at_r"], out["pmrp"], out["pmrp_valid"],
    )  # fmt: skip
    return out
