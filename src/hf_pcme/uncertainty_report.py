"""One model's uncertainty report: every measure of :mod:`hf_pcme.uncertainty` on one split, its JSON and plots.

Part of :mod:`hf_pcme.uncertainty` (which re-exports every public name here).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .uncertainty_binning import (
    DIRECTIONS,
    BinnedMetrics,
    PerQueryMetrics,
    VaguenessCorrelation,
    _evaluate_per_query,
    binned_metrics,
    embedding_uncertainty,
    failure_auroc,
    vagueness_correlation,
)
from .uncertainty_calibration import MAX_CALIBRATION_PAIRS, Calibration, calibration, calibration_pairs
from .uncertainty_checks import _check_num_bins, _json_float

REPORT_FILE = "uncertainty_report.json"

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
    if image_embeds.log_sigma2 is not None and text_embeds.log_sigma2 is not None:
        uncertainty = {"i2t": embedding_uncertainty(image_embeds.log_sigma2),
                       "t2i": embedding_uncertainty(text_embeds.log_sigma2)}
        arrays.update(image_uncertainty=uncertainty["i2t"], caption_uncertainty=uncertainty["t2i"])
        binned, auroc = _binned_and_auroc(uncertainty, per_query, num_bins)
        vagueness = _vagueness(view, uncertainty, arrays)
        levels = _specificity_levels(view, uncertainty["t2i"], per_query["t2i"], arrays)
    reliability, target_name = _calibration(
        model, view, image_embeds, text_embeds, calibration_bins, max_calibration_pairs, seed
    )
    return UncertaintyReport(
        name=name, scorer=scorer, num_images=view.num_images, num_texts=view.num_captions, metrics=metrics,
        vagueness=vagueness, binned=binned, failure_auroc=auroc, calibration=reliability,
        calibration_target=target_name, levels=levels, plots={}, arrays=arrays,
    )  # fmt: skip


def _binned_and_auroc(
    uncertainty: dict[str, np.ndarray], per_query: dict[str, PerQueryMetrics], num_bins: int
) -> tuple[dict[str, BinnedMetrics], dict[str, float | None]]:
    """Per direction: metrics per uncertainty bin, and the failure AUROC (``None`` without both hits and failures)."""
    binned, auroc = {}, {}
    for direction in DIRECTIONS:
        binned[direction] = binned_metrics(uncertainty[direction], per_query[direction], num_bins)
        hits = per_query[direction].recall_at_1
        scored = hits[~np.isnan(hits)]
        auroc[direction] = failure_auroc(uncertainty[direction], hits) if 0 < scored.sum() < len(scored) else None
    return binned, auroc


def _vagueness(view: Any, uncertainty: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> dict[str, VaguenessCorrelation]:
    """Caption and image uncertainty vs how many items each plausibly matches (when plausibility is known)."""
    if view.plausibility is None:
        return {}
    per_caption, per_image = plausible_counts(view.plausibility, view.num_images, view.num_captions)
    arrays.update(caption_vagueness=per_caption, image_vagueness=per_image)
    return {
        "caption": vagueness_correlation(uncertainty["t2i"], per_caption),
        "image": vagueness_correlation(uncertainty["i2t"], per_image),
    }


def _specificity_levels(
    view: Any, caption_uncertainty: np.ndarray, t2i: PerQueryMetrics, arrays: dict[str, np.ndarray]
) -> list[dict[str, Any]]:
    """One row per caption specificity level (shapes): captions, mean sigma^2, mean vagueness, t2i metrics."""
    if view.caption_specificity is None:
        return []
    specificity = np.asarray(view.caption_specificity)
    arrays["caption_specificity"] = specificity
    levels = []
    for level in sorted(set(specificity.tolist())):
        chosen = specificity == level
        row = {"level": int(level), "description": SPECIFICITY_NAMES.get(int(level), ""),
               "captions": int(chosen.sum()), "mean_sigma2": float(caption_uncertainty[chosen].mean())}
        if "caption_vagueness" in arrays:
            row["mean_plausible_images"] = float(arrays["caption_vagueness"][chosen].mean())
        for metric, array in t2i.as_dict().items():
            row[f"t2i_{metric}"] = 100.0 * float(np.nanmean(array[chosen])) if np.isfinite(array[chosen]).any() else float("nan")
        levels.append(row)
    return levels  # fmt: skip


def _calibration(
    model: Any, view: Any, image_embeds: Any, text_embeds: Any, num_bins: int, max_pairs: int, seed: int
) -> tuple[Calibration, str]:
    """Calibration of the model's match probability on :func:`calibration_pairs`, and the target's name."""
    image_rows, text_rows = calibration_pairs(view.num_images, view.num_captions, max_pairs, seed)
    target, target_name = _calibration_target(view, image_rows, text_rows)
    with torch.no_grad():
        match_prob = model.match_probability(
            image_embeds.select(torch.as_tensor(image_rows, device=image_embeds.mean.device)),
            text_embeds.select(torch.as_tensor(text_rows, device=text_embeds.mean.device)),
        )
    return calibration(match_prob.float().cpu().numpy(), target, num_bins), target_name


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
