"""Calibration of the match probability: reliability diagram, ECE, and the pairs it is measured on.

Part of :mod:`hf_pcme.uncertainty` (which re-exports every public name here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .uncertainty_checks import _check_num_bins, _flat, _json_list

#: Pairs used for calibration by default: every pair up to this many, else a seeded sub-grid (see :func:`calibration_pairs`).
MAX_CALIBRATION_PAIRS = 1 << 21


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
