"""Per-query uncertainty measures: vagueness correlation, metrics per uncertainty bin, failure AUROC.

Part of :mod:`hf_pcme.uncertainty` (which re-exports every public name here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau, rankdata, spearmanr

from .metrics import evaluate_retrieval
from .uncertainty_checks import _check_num_bins, _json_float, _json_list, _same_length, _vector

DIRECTIONS = ("i2t", "t2i")
#: Per-query metrics of the binned analysis (keys of :class:`BinnedMetrics.metrics`).
BINNED_METRICS = ("R@1", "r_precision", "pmrp")


# ---------------------------------------------------------------------------- uncertainty, vagueness
def embedding_uncertainty(log_sigma2: Any) -> np.ndarray:
    """Per-item uncertainty ``u = (1/D) sum_d sigma_d^2 = mean(exp(log_sigma2))``, ``(N, D) -> (N,)``.

    The same quantity as :attr:`hf_pcme.ProbabilisticEmbedding.uncertainty`, computed in float64.
    """
    if log_sigma2 is None:
        raise ValueError("log_sigma2 is None: a deterministic embedding has no uncertainty to analyse.")
    if isinstance(log_sigma2, torch.Tensor):
        log_sigma2 = log_sigma2.detach().double().cpu().numpy()
    array = np.asarray(log_sigma2, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"log_sigma2 must be (N, D) with N >= 1, got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError("log_sigma2 has NaN or infinite values; the model's variance head diverged.")
    return np.exp(array).mean(axis=1)


@dataclass
class VaguenessCorrelation:
    """Rank correlation of uncertainty with vagueness (positive: vaguer queries are more uncertain).

    ``NaN`` coefficients mean one of the two inputs is constant (the correlation is undefined).
    """

    spearman_rho: float
    spearman_p: float
    kendall_tau: float
    kendall_p: float
    num_queries: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def vagueness_correlation(uncertainty: Any, vagueness: Any) -> VaguenessCorrelation:
    """Spearman's rho and Kendall's tau-b of ``uncertainty`` vs ``vagueness``, with two-sided p-values.

    ``vagueness[q]`` is how many items query ``q`` plausibly matches (shapes: the number of test
    images a caption fits). Spearman's rho is the Pearson correlation of the average ranks (ties
    share their mean rank); Kendall's tau-b counts concordant minus discordant pairs over
    ``sqrt((n0 - n1)(n0 - n2))`` (ties in either input corrected). Both from ``scipy.stats``.
    """
    uncertainty = _vector(uncertainty, "uncertainty")
    vagueness = _vector(vagueness, "vagueness")
    _same_length(uncertainty=uncertainty, vagueness=vagueness)
    if len(uncertainty) < 2:
        raise ValueError(f"uncertainty has {len(uncertainty)} value(s); a correlation needs at least 2 queries.")
    if np.ptp(uncertainty) == 0 or np.ptp(vagueness) == 0:
        nan = float("nan")
        return VaguenessCorrelation(nan, nan, nan, nan, len(uncertainty))
    rho, rho_p = spearmanr(uncertainty, vagueness)
    tau, tau_p = kendalltau(uncertainty, vagueness)
    return VaguenessCorrelation(float(rho), float(rho_p), float(tau), float(tau_p), len(uncertainty))


# ---------------------------------------------------------------------------- per-query metrics
@dataclass
class PerQueryMetrics:
    """Retrieval values of every query of one direction, fractions in [0, 1], ``NaN`` = not scored.

    Attributes:
        recall_at_1: 1.0 if a pair of the query ranks first (pessimistic ties), else 0.0.
        r_precision: ``|top-R ∩ positives| / R`` (positives: the pairs, classes or given sets).
        pmrp: PMRP (mean over zetas for COCO labels), or ``None`` without a plausibility source.
    """

    recall_at_1: np.ndarray
    r_precision: np.ndarray
    pmrp: np.ndarray | None = None

    def as_dict(self) -> dict[str, np.ndarray]:
        """Metric name (:data:`BINNED_METRICS`) -> values, without the missing PMRP."""
        values = {"R@1": self.recall_at_1, "r_precision": self.r_precision, "pmrp": self.pmrp}
        return {name: array for name, array in values.items() if array is not None}


def per_query_metrics(text_to_image: Any, **evaluate_kwargs: Any) -> dict[str, PerQueryMetrics]:
    """R@1, R-Precision and PMRP of every query, both directions (``{"i2t": ..., "t2i": ...}``).

    Takes exactly the arguments of :func:`hf_pcme.metrics.evaluate_retrieval` (a score matrix
    ``scores=(num_images, num_texts)``, or embeddings and a ``scorer``; ``image_labels`` /
    ``image_classes`` / ``plausibility`` for PMRP; ``positives``) and ranks with it, so the
    values follow the package's definitions and tie rule, and the row blocks stay bounded in
    memory. i2t arrays have one entry per image, t2i arrays one per caption (caller's order).
    """
    if evaluate_kwargs.get("protocol") is not None:
        raise ValueError("per_query_metrics ranks over the whole set; protocol must be None.")
    return _evaluate_per_query(text_to_image=text_to_image, **evaluate_kwargs)[1]


def _evaluate_per_query(**evaluate_kwargs: Any) -> tuple[dict[str, float], dict[str, PerQueryMetrics]]:
    """The means of :func:`evaluate_retrieval` and the per-query values behind them."""
    values: dict[str, np.ndarray] = {}
    means = evaluate_retrieval(per_query=values, **evaluate_kwargs)
    # R-Precision is against the positives when they differ from the pairs; R@1 always against the pairs
    per_query = {
        direction: PerQueryMetrics(
            recall_at_1=values[f"{direction}_R@1"],
            r_precision=values[f"{direction}_r_precision"],
            pmrp=values.get(f"{direction}_pmrp"),
        )
        for direction in DIRECTIONS
    }
    return means, per_query


# ---------------------------------------------------------------------------- binned analysis
@dataclass
class BinnedMetrics:
    """Retrieval quality per uncertainty bin (bin 0 = the most certain queries).

    Attributes:
        bin_counts: ``(B,)`` queries per bin (equal up to one).
        uncertainty_range: ``(B, 2)`` smallest and largest uncertainty of each bin.
        mean_uncertainty: ``(B,)``.
        metrics: name -> ``(B,)`` mean over the bin's scored queries, in percent (``NaN``: none scored).
        spearman_rho, spearman_p: name -> Spearman correlation (and p-value) of bin index vs that
            metric over the bins with a value; negative = quality falls as uncertainty grows.
    """

    num_bins: int
    bin_counts: np.ndarray
    uncertainty_range: np.ndarray
    mean_uncertainty: np.ndarray
    metrics: dict[str, np.ndarray]
    spearman_rho: dict[str, float]
    spearman_p: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_bins": self.num_bins,
            "bin_counts": self.bin_counts.tolist(),
            "uncertainty_range": self.uncertainty_range.tolist(),
            "mean_uncertainty": self.mean_uncertainty.tolist(),
            "metrics": {name: _json_list(values) for name, values in self.metrics.items()},
            "spearman_rho": {name: _json_float(value) for name, value in self.spearman_rho.items()},
            "spearman_p": {name: _json_float(value) for name, value in self.spearman_p.items()},
        }


def uncertainty_bins(uncertainty: Any, num_bins: int = 10) -> list[np.ndarray]:
    """Query indices of ``num_bins`` equal-count bins, in increasing uncertainty.

    Queries are sorted by uncertainty (stable: equal values keep their index order) and the sorted
    list is cut into ``num_bins`` consecutive pieces whose sizes differ by at most one
    (``numpy.array_split``), as in PCME's "R@1 per uncertainty bin".
    """
    uncertainty = _vector(uncertainty, "uncertainty")
    num_bins = _check_num_bins(num_bins)
    if num_bins > len(uncertainty):
        raise ValueError(f"num_bins={num_bins} is larger than the number of queries ({len(uncertainty)}).")
    return np.array_split(np.argsort(uncertainty, kind="stable"), num_bins)


def binned_metrics(
    uncertainty: Any, per_query: PerQueryMetrics | Mapping[str, Any], num_bins: int = 10
) -> BinnedMetrics:
    """The PCME / PCME++ uncertainty analysis: each metric's mean per uncertainty bin, and its trend.

    Bins come from :func:`uncertainty_bins`. For bin ``b`` and metric ``m``:
    ``metric[m][b] = 100 * mean_{q in bin b, m(q) not NaN} m(q)``, and
    ``spearman_rho[m] = Spearman(b, metric[m][b])`` over the bins with a value (PCME, Chun et al.
    CVPR 2021, uncertainty analysis: R@1 per uncertainty bin; PCME++, Chun ICLR 2024, the same
    analysis with R@1 / R-Precision / PMRP). A meaningful uncertainty gives a *negative* rho.

    Args:
        uncertainty: ``(Q,)`` one value per query (e.g. :func:`embedding_uncertainty` of the queries).
        per_query: :class:`PerQueryMetrics` or a mapping name -> ``(Q,)`` values (``NaN`` = not
            scored; e.g. R@1 hits as 0/1).
        num_bins: number of bins, ``1 <= num_bins <= Q``.
    """
    uncertainty = _vector(uncertainty, "uncertainty")
    values = per_query.as_dict() if isinstance(per_query, PerQueryMetrics) else dict(per_query)
    if not values:
        raise ValueError("per_query holds no metric; give e.g. {'R@1': hits}.")
    metrics = {}
    for name, array in values.items():
        metrics[name] = _vector(array, f"per_query[{name!r}]", allow_nan=True)
        _same_length(uncertainty=uncertainty, **{f"per_query[{name!r}]": metrics[name]})
        if np.isnan(metrics[name]).all():
            raise ValueError(f"per_query[{name!r}] scores no query (all NaN): no query has a positive / plausible item.")
    bins = uncertainty_bins(uncertainty, num_bins)
    per_bin = {}
    rho, p_value = {}, {}
    for name, array in metrics.items():
        means = np.array([np.nanmean(array[b]) if np.isfinite(array[b]).any() else np.nan for b in bins])
        per_bin[name] = 100.0 * means
        rho[name], p_value[name] = _bin_trend(means)
    return BinnedMetrics(
        num_bins=len(bins),
        bin_counts=np.array([len(b) for b in bins]),
        uncertainty_range=np.array([[uncertainty[b].min(), uncertainty[b].max()] for b in bins]),
        mean_uncertainty=np.array([uncertainty[b].mean() for b in bins]),
        metrics=per_bin,
        spearman_rho=rho,
        spearman_p=p_value,
    )


def _bin_trend(means: np.ndarray) -> tuple[float, float]:
    """Spearman(bin index, value) over the bins with a value; NaN if fewer than 2 or constant."""
    present = np.flatnonzero(np.isfinite(means))
    if len(present) < 2 or np.ptp(means[present]) == 0:
        return float("nan"), float("nan")
    rho, p_value = spearmanr(present, means[present])
    return float(rho), float(p_value)


# ---------------------------------------------------------------------------- failure prediction
def failure_auroc(uncertainty: Any, r1_hit: Any) -> float:
    """AUROC of uncertainty as a detector of R@1 failures (1 = perfect, 0.5 = chance).

    ``AUROC = P(u_failure > u_hit) + 1/2 P(u_failure = u_hit)`` over all (failed query, hit query)
    pairs, i.e. the Mann-Whitney ``U`` of the failures divided by ``n_fail * n_hit``:
    ``U = sum(average ranks of the failures' uncertainties) - n_fail (n_fail + 1) / 2``.

    Args:
        uncertainty: ``(Q,)`` uncertainty per query (higher should mean failure).
        r1_hit: ``(Q,)`` 1 / True if the query's R@1 is a hit, 0 / False if not; ``NaN`` marks a
            query that is not scored (left out), as :class:`PerQueryMetrics` does.
    """
    uncertainty = _vector(uncertainty, "uncertainty")
    hits = _vector(r1_hit, "r1_hit", allow_nan=True)
    _same_length(uncertainty=uncertainty, r1_hit=hits)
    scored = ~np.isnan(hits)
    if not np.isin(hits[scored], (0.0, 1.0)).all():
        raise ValueError("r1_hit must hold 0 / 1 (or bool) per query, NaN for a query that is not scored.")
    uncertainty, failed = uncertainty[scored], hits[scored] == 0
    num_failures, num_hits = int(failed.sum()), int((~failed).sum())
    if num_failures == 0 or num_hits == 0:
        raise ValueError(
            f"r1_hit has {num_failures} failure(s) and {num_hits} hit(s); the AUROC needs at least one of each."
        )
    ranks = rankdata(uncertainty)  # average ranks: a tie counts 1/2
    u_statistic = ranks[failed].sum() - num_failures * (num_failures + 1) / 2.0
    return float(u_statistic / (num_failures * num_hits))

