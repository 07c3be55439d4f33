"""Does the learned uncertainty mean something? Correlation, binned metrics, failure AUROC, calibration.

Pure functions of numpy arrays (or torch tensors), usable on any data set:

- :func:`embedding_uncertainty`: an item's uncertainty, the mean of ``sigma^2`` over the ``D``
  dimensions (the package's convention, ``ProbabilisticEmbedding.uncertainty``).
- :func:`vagueness_correlation`: Spearman's rho and Kendall's tau between uncertainty and the
  *vagueness* of each query (how many items it plausibly matches), when that is known (shapes).
- :func:`per_query_metrics` + :func:`binned_metrics`: the analysis of PCME (Chun et al., CVPR
  2021, its uncertainty analysis: R@1 per uncertainty bin) and PCME++ (Chun, ICLR 2024):
  queries sorted by uncertainty into equal-count bins, R@1, R-Precision and PMRP per bin, and the
  Spearman correlation of bin index vs metric (a meaningful uncertainty gives a negative one:
  the more uncertain a query, the worse it is retrieved).
- :func:`failure_auroc`: how well uncertainty predicts that a query's R@1 fails.
- :func:`calibration`: reliability diagram and expected calibration error of the match probability.
- :func:`write_uncertainty_report`: all of the above for one model's test embeddings, as
  ``uncertainty_report.json`` and PNG plots; :func:`format_uncertainty_report` prints it.

Per-query retrieval values come from the package's own metric code
(:func:`hf_pcme.metrics.evaluate_retrieval` with ``per_query=``): same ranking, same tie rule,
and their mean is exactly the reported metric.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import kendalltau, rankdata, spearmanr

from .metrics import evaluate_retrieval

DIRECTIONS = ("i2t", "t2i")
#: Per-query metrics of the binned analysis (keys of :class:`BinnedMetrics.metrics`).
BINNED_METRICS = ("R@1", "r_precision", "pmrp")
REPORT_FILE = "uncertainty_report.json"
#: Pairs used for calibration by default: every pair up to this many, else a seeded sub-grid (see :func:`calibration_pairs`).
MAX_CALIBRATION_PAIRS = 1 << 21


# ---------------------------------------------------------------------------- input checks
def _vector(value: Any, name: str, *, allow_nan: bool = False) -> np.ndarray:
    """A finite 1-D float64 array (NaN allowed only where documented: a query that is not scored)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a 1-D array of numbers, got {type(value).__name__}.") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per query), got shape {array.shape}.")
    if array.size == 0:
        raise ValueError(f"{name} is empty: the analysis needs at least one query.")
    bad = np.isinf(array) if allow_nan else ~np.isfinite(array)
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} NaN or infinite value(s) (e.g. at index {int(np.flatnonzero(bad)[0])}); "
            "check the embeddings (a NaN log_sigma2 means a diverged model) or drop those queries."
        )
    return array


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"the inputs must have one value per query each, got lengths {lengths}.")


def _check_num_bins(num_bins: int, name: str = "num_bins") -> int:
    if isinstance(num_bins, bool) or int(num_bins) != num_bins or num_bins < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {num_bins!r}.")
    return int(num_bins)


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


# ---------------------------------------------------------------------------- calibration
@dataclass
class Calibration:
    """Reliability diagram and calibration errors of predicted probabilities.

    Attributes:
        bin_edges: ``(B + 1,)`` equal-width bins over [0, 1] (the last bin includes 1).
        mean_confidence: ``(B,)`` mean predicted probability per bin (``NaN``: empty bin).
        observed_frequency: ``(B,)`` mean target per bin (``NaN``: empty bin).
        counts: ``(B,)`` pairs per bin.
        ece: expected calibration error ``sum_b (n_b / N) |observed_b - confidence_b|``.
        max_calibration_error: ``max_b |observed_b - confidence_b|`` over non-empty bins.
        num_pairs, num_positive: pairs used, and how many have target 1 (or the sum of the targets).
    """

    bin_edges: np.ndarray
    mean_confidence: np.ndarray
    observed_frequency: np.ndarray
    counts: np.ndarray
    ece: float
    max_calibration_error: float
    num_pairs: int
    num_positive: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "bin_edges": self.bin_edges.tolist(),
            "mean_confidence": _json_list(self.mean_confidence),
            "observed_frequency": _json_list(self.observed_frequency),
            "counts": self.counts.tolist(),
            "ece": self.ece,
            "max_calibration_error": self.max_calibration_error,
            "num_pairs": self.num_pairs,
            "num_positive": self.num_positive,
        }


def calibration(match_prob: Any, target: Any, num_bins: int = 10) -> Calibration:
    """Reliability diagram and expected calibration error (ECE) of match probabilities.

    The pairs are put in ``num_bins`` equal-width bins of predicted probability
    (bin ``b = min(floor(p * B), B - 1)``). Per bin: the mean prediction (confidence), the mean
    target (observed frequency) and the count;
    ``ECE = sum_b (n_b / N) |observed_b - confidence_b|`` (Guo et al., ICML 2017; PCME++ reports
    the calibration of its match probability, Chun ICLR 2024).

    Args:
        match_prob: predicted match probabilities in [0, 1], any shape (e.g. an image x caption block).
        target: the same shape: 1 / 0 (a ground-truth positive pair, or an exactly plausible one
            on shapes) or a fraction in [0, 1] (soft plausibility).
        num_bins: number of bins, >= 1.
    """
    num_bins = _check_num_bins(num_bins)
    if tuple(np.shape(match_prob)) != tuple(np.shape(target)):
        raise ValueError(f"match_prob and target must have the same shape, got {tuple(np.shape(match_prob))} and "
                         f"{tuple(np.shape(target))}.")
    probabilities = _flat(match_prob, "match_prob")
    targets = _flat(target, "target")
    for name, array in (("match_prob", probabilities), ("target", targets)):
        if array.min() < 0 or array.max() > 1:
            raise ValueError(f"{name} must lie in [0, 1], got values in [{array.min():.4g}, {array.max():.4g}].")
    if targets.sum() == 0:
        raise ValueError("target has no positive pair; calibration against all-negative targets says nothing. "
                         "Check that the target matches the pairs of match_prob.")
    index = np.minimum((probabilities * num_bins).astype(np.int64), num_bins - 1)
    counts = np.bincount(index, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=probabilities, minlength=num_bins) / counts
        observed = np.bincount(index, weights=targets, minlength=num_bins) / counts
    gaps = np.abs(observed - confidence)
    filled = counts > 0
    return Calibration(
        bin_edges=np.linspace(0.0, 1.0, num_bins + 1),
        mean_confidence=confidence,
        observed_frequency=observed,
        counts=counts,
        ece=float((counts[filled] * gaps[filled]).sum() / counts.sum()),
        max_calibration_error=float(gaps[filled].max()),
        num_pairs=int(counts.sum()),
        num_positive=float(targets.sum()),
    )


def _flat(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().double().cpu().numpy()
    try:
        array = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an array of numbers, got {type(value).__name__}.") from None
    if array.size == 0:
        raise ValueError(f"{name} is empty.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has {int((~np.isfinite(array)).sum())} NaN or infinite value(s).")
    return array


def calibration_pairs(
    num_images: int, num_texts: int, max_pairs: int = MAX_CALIBRATION_PAIRS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Image rows and caption rows whose grid of pairs is used for calibration.

    Every pair when ``num_images * num_texts <= max_pairs``; else a seeded random subset of the
    images and one of the captions (the same fraction ``sqrt(max_pairs / (num_images * num_texts))``
    of each), sorted. Every pair is then equally likely to be in the grid, so the per-bin
    frequencies estimate those of all pairs.
    """
    if num_images < 1 or num_texts < 1:
        raise ValueError(f"calibration needs images and captions, got {num_images} and {num_texts}.")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}.")
    if num_images * num_texts <= max_pairs:
        return np.arange(num_images), np.arange(num_texts)
    fraction = math.sqrt(max_pairs / (num_images * num_texts))
    image_count = min(num_images, max(1, round(num_images * fraction)))
    text_count = min(num_texts, max(1, max_pairs // image_count))
    generator = np.random.default_rng(seed)
    images = np.sort(generator.choice(num_images, image_count, replace=False))
    texts = np.sort(generator.choice(num_texts, text_count, replace=False))
    return images, texts


# ---------------------------------------------------------------------------- JSON helpers
def _json_float(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _json_list(values: np.ndarray) -> list[float | None]:
    return [_json_float(float(v)) for v in np.asarray(values, dtype=np.float64)]


# ---------------------------------------------------------------------------- one model's report
#: Names of the shapes specificity levels (``RetrievalSplit.caption_specificity``), for tables and plots.
SPECIFICITY_NAMES = {0: "exact", 1: "all shapes, no positions", 2: "kind + colour", 3: "one attribute", 4: "some shapes"}


@dataclass
class UncertaintyReport:
    """Everything :func:`write_uncertainty_report` measured for one model on one split.

    Uncertainty fields are empty for a model without variances (deterministic head); the retrieval
    metrics and the calibration are there for every model.

    Attributes:
        name, scorer: the model's name and the score it ranks by.
        num_images, num_texts: the split's size.
        metrics: the retrieval means (percent) of :func:`hf_pcme.metrics.evaluate_retrieval`.
        vagueness: ``"caption"`` (sigma^2 of a caption vs the images it fits) and ``"image"``
            (sigma^2 of an image vs the captions that fit it), when plausibility is known (shapes).
        binned: ``"i2t"`` (image queries, image uncertainty) and ``"t2i"`` (captions, caption uncertainty).
        failure_auroc: per direction; ``None`` when every scored query hits (or every one fails).
        calibration: of the model's match probability on :func:`calibration_pairs`.
        calibration_target: ``"plausibility"`` (shapes), ``"classes"`` (CUB) or ``"pairs"`` (COCO).
        levels: per specificity level (shapes): captions, mean sigma^2, mean vagueness, t2i metrics.
        plots: plot name -> PNG path (filled by :func:`write_uncertainty_report`).
        arrays: the per-query arrays behind the numbers (not written to JSON).
    """

    name: str
    scorer: str
    num_images: int
    num_texts: int
    metrics: dict[str, float]
    vagueness: dict[str, VaguenessCorrelation]
    binned: dict[str, BinnedMetrics]
    failure_auroc: dict[str, float | None]
    calibration: Calibration | None
    calibration_target: str
    levels: list[dict[str, Any]]
    plots: dict[str, str]
    arrays: dict[str, np.ndarray]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN -> ``None``), without the per-query arrays."""
        return {
            "name": self.name,
            "scorer": self.scorer,
            "num_images": self.num_images,
            "num_texts": self.num_texts,
            "metrics": self.metrics,
            "vagueness": {key: {k: _json_float(v) if isinstance(v, float) else v for k, v in value.to_dict().items()}
                          for key, value in self.vagueness.items()},
            "binned": {key: value.to_dict() for key, value in self.binned.items()},
            "failure_auroc": {key: _json_float(value) for key, value in self.failure_auroc.items()},
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "calibration_target": self.calibration_target,
            "levels": [{k: _json_float(v) if isinstance(v, float) else v for k, v in row.items()} for row in self.levels],
            "plots": self.plots,
        }


def plausible_counts(plausibility: Any, num_images: int, num_texts: int, chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """``(plausible images per caption (num_texts,), plausible captions per image (num_images,))``
    from ``plausibility(image_rows, caption_rows) -> bool block``, by caption chunks."""
    per_caption = np.zeros(num_texts, dtype=np.int64)
    per_image = np.zeros(num_images, dtype=np.int64)
    images = np.arange(num_images)
    for start in range(0, num_texts, chunk_size):
        columns = np.arange(start, min(start + chunk_size, num_texts))
        block = np.asarray(plausibility(images, columns), dtype=bool)
        per_caption[columns] = block.sum(0)
        per_image += block.sum(1)
    return per_caption, per_image


def _calibration_target(view: Any, image_rows: np.ndarray, text_rows: np.ndarray) -> tuple[np.ndarray, str]:
    """Target of each (image, caption) pair of the grid: exact plausibility, same class, or the pairs."""
    if view.plausibility is not None:
        return np.asarray(view.plausibility(image_rows, text_rows), dtype=np.float64), "plausibility"
    text_images = np.asarray(view.text_to_image)[text_rows]
    if view.image_classes is not None:
        classes = np.asarray(view.image_classes)
        same = (classes[image_rows][:, None] == classes[text_images][None, :]) & (classes[image_rows][:, None] >= 0)
        return same.astype(np.float64), "classes"
    return (image_rows[:, None] == text_images[None, :]).astype(np.float64), "pairs"


def compute_uncertainty_report(
    model: Any,
    view: Any,
    image_embeds: Any,
    text_embeds: Any,
    *,
    scorer: str,
    name: str = "model",
    num_bins: int = 10,
    calibration_bins: int = 10,
    max_calibration_pairs: int = MAX_CALIBRATION_PAIRS,
    seed: int = 0,
) -> UncertaintyReport:
    """The uncertainty analysis of one model on one :class:`~hf_pcme.data.RetrievalSplit` (no files written).

    Args:
        model: the :class:`~hf_pcme.PCMEModel` (its ``negative_scale`` / ``shift`` and ``match_probability``).
        view: the split (``text_to_image``; ``plausibility`` / ``image_labels`` / ``image_classes``).
        image_embeds, text_embeds: :class:`~hf_pcme.ProbabilisticEmbedding` of every image / caption
            (e.g. from :func:`hf_pcme.training.evaluation.encode_for_scorer`; with ``samples`` for
            ``scorer="sampled"``).
        scorer: the ranking score (:data:`hf_pcme.metrics.SCORERS`), e.g. the model's own.
        num_bins: uncertainty bins of :func:`binned_metrics`. calibration_bins: bins of :func:`calibration`.
        max_calibration_pairs, seed: the pairs of :func:`calibration_pairs`.

    Calibration uses the model's match probability on every pair of the split up to
    ``max_calibration_pairs``, else on a seeded random sub-grid of images x captions, against the
    exact plausibility (shapes), the same class (CUB) or the ground-truth pairs (COCO).

    Reading it on shapes: R@1 and R-Precision count only a caption's *own* image, which a vague
    caption ("some shapes") cannot single out among its hundreds of plausible images; their t2i
    values per bin therefore follow vagueness as much as quality. PMRP counts every plausible
    image and is the per-bin metric that separates the two.
    """
    num_bins = _check_num_bins(num_bins)
    calibration_bins = _check_num_bins(calibration_bins, "calibration_bins")
    from .evaluation import retrieval_inputs

    metrics, per_query = _evaluate_per_query(
        **retrieval_inputs(model, view, image_embeds, text_embeds, scorer=scorer, seed=seed)
    )
    arrays: dict[str, np.ndarray] = {f"{d}_{k}": v for d, m in per_query.items() for k, v in m.as_dict().items()}
    vagueness, binned, auroc, levels = {}, {}, {}, []
    probabilistic = image_embeds.log_sigma2 is not None and text_embeds.log_sigma2 is not None
    if probabilistic:
        uncertainty = {"i2t": embedding_uncertainty(image_embeds.log_sigma2),
                       "t2i": embedding_uncertainty(text_embeds.log_sigma2)}
        arrays.update(image_uncertainty=uncertainty["i2t"], caption_uncertainty=uncertainty["t2i"])
        for direction in DIRECTIONS:
            binned[direction] = binned_metrics(uncertainty[direction], per_query[direction], num_bins)
            hits = per_query[direction].recall_at_1
            scored = hits[~np.isnan(hits)]
            auroc[direction] = failure_auroc(uncertainty[direction], hits) if 0 < scored.sum() < len(scored) else None
        if view.plausibility is not None:
            per_caption, per_image = plausible_counts(view.plausibility, view.num_images, view.num_captions)
            arrays.update(caption_vagueness=per_caption, image_vagueness=per_image)
            vagueness["caption"] = vagueness_correlation(uncertainty["t2i"], per_caption)
            vagueness["image"] = vagueness_correlation(uncertainty["i2t"], per_image)
        if view.caption_specificity is not None:
            specificity = np.asarray(view.caption_specificity)
            arrays["caption_specificity"] = specificity
            for level in sorted(set(specificity.tolist())):
                chosen = specificity == level
                row = {"level": int(level), "description": SPECIFICITY_NAMES.get(int(level), ""),
                       "captions": int(chosen.sum()), "mean_sigma2": float(uncertainty["t2i"][chosen].mean())}
                if "caption_vagueness" in arrays:
                    row["mean_plausible_images"] = float(arrays["caption_vagueness"][chosen].mean())
                for metric, array in per_query["t2i"].as_dict().items():
                    row[f"t2i_{metric}"] = 100.0 * float(np.nanmean(array[chosen])) if np.isfinite(array[chosen]).any() else float("nan")
                levels.append(row)
    image_rows, text_rows = calibration_pairs(view.num_images, view.num_captions, max_calibration_pairs, seed)
    target, target_name = _calibration_target(view, image_rows, text_rows)
    with torch.no_grad():
        match_prob = model.match_probability(
            image_embeds.select(torch.as_tensor(image_rows, device=image_embeds.mean.device)),
            text_embeds.select(torch.as_tensor(text_rows, device=text_embeds.mean.device)),
        )
    reliability = calibration(match_prob.float().cpu().numpy(), target, calibration_bins)
    return UncertaintyReport(
        name=name, scorer=scorer, num_images=view.num_images, num_texts=view.num_captions, metrics=metrics,
        vagueness=vagueness, binned=binned, failure_auroc=auroc, calibration=reliability,
        calibration_target=target_name, levels=levels, plots={}, arrays=arrays,
    )  # fmt: skip


def write_uncertainty_report(
    output_dir: str | Path,
    model: Any,
    view: Any,
    image_embeds: Any,
    text_embeds: Any,
    *,
    scorer: str,
    name: str = "model",
    num_bins: int = 10,
    calibration_bins: int = 10,
    max_calibration_pairs: int = MAX_CALIBRATION_PAIRS,
    seed: int = 0,
) -> UncertaintyReport:
    """:func:`compute_uncertainty_report`, then ``uncertainty_report.json`` and PNG plots in ``output_dir``.

    Plots: ``uncertainty_vs_vagueness.png`` (captions; shapes only), ``uncertainty_binned_metrics.png``
    and ``reliability_diagram.png``. The arguments are those of :func:`compute_uncertainty_report`.
    Returns the report (its ``plots`` filled).
    """
    from .uncertainty_plots import plot_binned_metrics, plot_reliability_diagram, plot_uncertainty_vs_vagueness

    report = compute_uncertainty_report(
        model, view, image_embeds, text_embeds, scorer=scorer, name=name, num_bins=num_bins,
        calibration_bins=calibration_bins, max_calibration_pairs=max_calibration_pairs, seed=seed,
    )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    arrays = report.arrays
    if "caption" in report.vagueness:
        report.plots["uncertainty_vs_vagueness"] = str(plot_uncertainty_vs_vagueness(
            output_dir / "uncertainty_vs_vagueness.png", arrays["caption_uncertainty"], arrays["caption_vagueness"],
            groups=arrays.get("caption_specificity"),
            group_names=SPECIFICITY_NAMES if "caption_specificity" in arrays else None,
            spearman_rho=report.vagueness["caption"].spearman_rho, title=f"{report.name}: captions",
        ))  # fmt: skip
    if report.binned:
        report.plots["binned_metrics"] = str(
            plot_binned_metrics(output_dir / "uncertainty_binned_metrics.png", report.binned, title=report.name)
        )
    if report.calibration is not None:
        report.plots["reliability_diagram"] = str(plot_reliability_diagram(
            output_dir / "reliability_diagram.png", report.calibration,
            title=f"{report.name} vs {report.calibration_target}:",
        ))  # fmt: skip
    (output_dir / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
    return report


def format_uncertainty_report(report: UncertaintyReport) -> str:
    """A compact, printable summary of a report (numbers in percent where they are metrics)."""
    lines = [f"uncertainty report: {report.name} ({report.scorer}), {report.num_images} images, {report.num_texts} captions"]
    if not report.binned:
        lines.append("  no uncertainty (the model has no variance head): calibration only")
    for key, result in report.vagueness.items():
        lines.append(f"  {key} sigma^2 vs vagueness: Spearman {_signed(result.spearman_rho, 3)} (p {result.spearman_p:.2g}), "
                     f"Kendall {_signed(result.kendall_tau, 3)} (p {result.kendall_p:.2g}), n = {result.num_queries}")
    for direction, result in report.binned.items():
        names = list(result.metrics)
        lines.append(f"  {direction}: metric per uncertainty bin (1 = most certain), percent; "
                     f"Spearman(bin, metric): " + ", ".join(f"{n} {_signed(result.spearman_rho[n])}" for n in names))
        lines.append(f"    {'bin':<12}" + "".join(f"{i + 1:>7}" for i in range(result.num_bins)))
        for name in names:
            lines.append(f"    {name:<12}" + "".join(f"{v:>7.1f}" for v in result.metrics[name]))
    if report.failure_auroc:
        lines.append("  AUROC of sigma^2 predicting an R@1 failure: " + ", ".join(
            f"{d} {'n/a' if v is None else f'{v:.3f}'}" for d, v in report.failure_auroc.items()))
    if report.calibration is not None:
        c = report.calibration
        lines.append(f"  calibration of p(match) vs {report.calibration_target}: ECE {c.ece:.4f}, "
                     f"max {c.max_calibration_error:.4f}, {c.num_pairs} pairs ({c.num_positive:.0f} positive)")
    if report.levels:
        lines.append(f"  {'level':<6}{'specificity':<26}{'captions':>9}{'mean sigma^2':>14}{'plausible':>10}{'t2i R@1':>9}{'t2i PMRP':>9}")
        for row in report.levels:
            lines.append(f"  {row['level']:<6}{row['description']:<26}{row['captions']:>9}{row['mean_sigma2']:>14.4g}"
                         f"{row.get('mean_plausible_images', float('nan')):>10.1f}{row['t2i_R@1']:>9.1f}"
                         f"{row.get('t2i_pmrp', float('nan')):>9.1f}")
    for name, path in report.plots.items():
        lines.append(f"  plot {name}: {path}")
    return "\n".join(lines)


def _signed(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:+.{digits}f}"
