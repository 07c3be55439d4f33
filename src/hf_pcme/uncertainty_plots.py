"""PNG plots of the uncertainty analysis (:mod:`hf_pcme.uncertainty`): vagueness, binned metrics, reliability.

matplotlib is imported inside each function, with the non-interactive Agg backend, so importing
this module (or :mod:`hf_pcme.uncertainty`) never needs a display or matplotlib itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .uncertainty import BinnedMetrics, Calibration

METRIC_LABELS = {"R@1": "R@1", "r_precision": "R-Precision", "pmrp": "PMRP"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path)
    _pyplot().close(figure)
    return path


def plot_uncertainty_vs_vagueness(
    path: str | Path,
    uncertainty: Any,
    vagueness: Any,
    *,
    groups: Any = None,
    group_names: Mapping[int, str] | None = None,
    spearman_rho: float | None = None,
    title: str = "",
) -> Path:
    """Scatter of uncertainty vs vagueness (log x) and, with ``groups`` (e.g. specificity levels),
    a box plot of the uncertainty per group. Returns the PNG path."""
    plt = _pyplot()
    uncertainty, vagueness = np.asarray(uncertainty, dtype=float), np.asarray(vagueness, dtype=float)
    panels = 2 if groups is not None else 1
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), dpi=110, squeeze=False)
    scatter = axes[0, 0]
    if groups is not None:
        groups = np.asarray(groups)
        for group in sorted(set(groups.tolist())):
            chosen = groups == group
            label = f"{group}: {group_names.get(group, '')}" if group_names else str(group)
            scatter.scatter(vagueness[chosen], uncertainty[chosen], s=7, alpha=0.5, label=label)
        scatter.legend(fontsize=7, markerscale=2)
    else:
        scatter.scatter(vagueness, uncertainty, s=7, alpha=0.5)
    if (vagueness > 0).all():
        scatter.set_xscale("log")
    scatter.set_xlabel("vagueness: plausible matches per query")
    scatter.set_ylabel("uncertainty: mean sigma^2")
    rho = "" if spearman_rho is None else f"Spearman rho = {spearman_rho:+.3f}"
    scatter.set_title(" ".join(part for part in (title, rho) if part), fontsize=9)
    if groups is not None:
        box = axes[0, 1]
        names = sorted(set(groups.tolist()))
        box.boxplot([uncertainty[groups == group] for group in names], showfliers=False)
        box.set_xticks(range(1, len(names) + 1), [str(name) for name in names])
        box.set_xlabel("group (specificity level; higher = vaguer)" if group_names else "group")
        box.set_ylabel("uncertainty: mean sigma^2")
        box.set_title("uncertainty per group", fontsize=9)
    return _save(figure, path)


def plot_binned_metrics(path: str | Path, binned: Mapping[str, BinnedMetrics], *, title: str = "") -> Path:
    """One panel per direction: each metric (percent) per uncertainty bin, with its bin-vs-metric Spearman rho."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(binned), figsize=(5.2 * len(binned), 4.0), dpi=110, squeeze=False)
    for axis, (direction, result) in zip(axes[0], binned.items()):
        positions = np.arange(1, result.num_bins + 1)
        for name, values in result.metrics.items():
            rho = result.spearman_rho[name]
            axis.plot(positions, values, marker="o", label=f"{METRIC_LABELS.get(name, name)} (rho {rho:+.2f})")
        axis.set_xticks(positions)
        axis.set_xlabel("uncertainty bin (1 = most certain queries)")
        axis.set_ylabel("percent")
        axis.set_ylim(0, 100)
        axis.set_title(f"{title} {direction}".strip(), fontsize=9)
        axis.legend(fontsize=7)
    return _save(figure, path)


def plot_reliability_diagram(path: str | Path, result: Calibration, *, title: str = "") -> Path:
    """Observed frequency vs mean predicted probability per bin (the diagonal is perfect
    calibration), and below, the pairs per bin (log scale)."""
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(5.0, 5.5), dpi=110, height_ratios=(3, 1), sharex=True)
    edges = result.bin_edges
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    filled = result.counts > 0
    top.bar(centres[filled], result.observed_frequency[filled], width=width[filled] * 0.9, alpha=0.7,
            edgecolor="black", label="observed frequency")
    top.plot(result.mean_confidence[filled], result.observed_frequency[filled], "o", color="black", markersize=3,
             label="(mean p, observed)")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.set_ylim(0, 1)
    top.set_ylabel("observed frequency")
    top.set_title(f"{title} ECE = {result.ece:.4f} ({result.num_pairs} pairs)".strip(), fontsize=9)
    top.legend(fontsize=7, loc="upper left")
    bottom.bar(centres[filled], result.counts[filled], width=width[filled] * 0.9, color="grey", log=True)
    bottom.set_xlabel("predicted match probability")
    bottom.set_ylabel("pairs")
    bottom.set_xlim(0, 1)
    return _save(figure, path)


__all__ = ["plot_binned_metrics", "plot_reliability_diagram", "plot_uncertainty_vs_vagueness"]
