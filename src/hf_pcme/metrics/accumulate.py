"""Per-query metric values of the ranked blocks -> means in percent, per fold and overall.

Every returned value is the mean over the queries that have at least one relevant item (the
others are *not scored*); the 1K protocol averages the fold means (a fold where no query is
scored is left out of that metric's average).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from .layout import DIRECTIONS


class Means:
    """Sums and counts of per-query values, per (prefix, fold, metric name)."""

    def __init__(self) -> None:
        self.sums: dict[tuple[str, int, str], float] = defaultdict(float)
        self.counts: dict[tuple[str, int, str], int] = defaultdict(int)

    def add(self, prefix: str, fold: int, columns: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        """Add the per-query ``(name, values, valid)`` columns of one block (one masked sum for all)."""
        valid = torch.stack([column[2] for column in columns], 1)
        values = torch.stack([column[1].double() for column in columns], 1)
        sums = torch.where(valid, values, 0.0).sum(0).tolist()
        counts = valid.sum(0).tolist()
        for (name, _, _), total, count in zip(columns, sums, counts):
            self.sums[prefix, fold, name] += total
            self.counts[prefix, fold, name] += count

    def mean(self, prefix: str, name: str) -> float:
        """Mean over the queries (one fold), or mean over folds of the fold means (1K)."""
        folds = [fold for (p, fold, n) in self.counts if p == prefix and n == name and self.counts[p, fold, n] > 0]
        if not folds:
            raise ValueError(
                f"No query has a relevant item for {prefix}{name}: every query was skipped "
                "(no labelled query / no positive / empty query set). Check the labels or positives given."
            )
        return 100.0 * sum(self.sums[prefix, f, name] / self.counts[prefix, f, name] for f in folds) / len(folds)


def record_per_query(per_query: dict, ranks, piece_start: int, direction: str, ks, plausible, num_queries: int,
                      original_index) -> None:
    """Write one piece's per-query values (NaN = not scored) at the queries' positions in the caller's order."""
    for name, values, valid in _columns(ranks, direction, ks, plausible):
        if name not in per_query:
            per_query[name] = np.full(num_queries, np.nan)
        values = np.where(valid.cpu().numpy(), values.double().cpu().numpy(), np.nan)
        positions = np.arange(piece_start, piece_start + values.shape[0])
        per_query[name][positions if original_index is None else original_index[positions]] = values


def accumulate(means: Means, ranks, prefix: str, fold: int, direction: str, ks, plausible) -> None:
    means.add(prefix, fold, _columns(ranks, direction, ks, plausible))


def _columns(ranks, direction: str, ks, plausible) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The ``(metric name, per-query values, valid)`` columns of one ranked piece."""
    columns = []
    for name, hits in ranks.recall_hits.items():
        valid = ranks.valid[name]
        label = "" if name == "pairs" else "positives_"
        for column, k in enumerate(ks):
            columns.append((f"{direction}_{label}R@{k}", hits[:, column], valid))
        if name == "positives" or "positives" not in ranks.recall_hits:
            columns.append((f"{direction}_r_precision", ranks.r_precision[name], valid))
            columns.append((f"{direction}_map_at_r", ranks.ap_at_r[name], valid))
    if plausible is not None:
        for column, zeta in enumerate(plausible.zetas):
            name = f"{direction}_pmrp_zeta{zeta}" if plausible.labels is not None else f"{direction}_pmrp"
            columns.append((name, ranks.pmrp[:, column], ranks.pmrp_valid[:, column]))
    return columns


def collect(means: Means, prefixes, ks, relevance_kinds, plausible) -> dict[str, float]:
    results: dict[str, float] = {}
    for prefix in prefixes:
        for direction in DIRECTIONS:
            for k in ks:
                results[f"{prefix}{direction}_R@{k}"] = means.mean(prefix, f"{direction}_R@{k}")
        results[f"{prefix}rsum"] = sum(results[f"{prefix}{d}_R@{k}"] for d in DIRECTIONS for k in ks)
        for direction in DIRECTIONS:
            for name in ("r_precision", "map_at_r"):
                results[f"{prefix}{direction}_{name}"] = means.mean(prefix, f"{direction}_{name}")
            if "positives" in relevance_kinds:
                for k in ks:
                    results[f"{prefix}{direction}_positives_R@{k}"] = means.mean(prefix, f"{direction}_positives_R@{k}")
            if plausible is not None:
                if plausible.labels is not None:
                    per_zeta = [means.mean(prefix, f"{direction}_pmrp_zeta{z}") for z in plausible.zetas]
                    for zeta, value in zip(plausible.zetas, per_zeta):
                        results[f"{prefix}{direction}_pmrp_zeta{zeta}"] = value
                    results[f"{prefix}{direction}_pmrp"] = sum(per_zeta) / len(per_zeta)
                else:
                    results[f"{prefix}{direction}_pmrp"] = means.mean(prefix, f"{direction}_pmrp")
    return results
