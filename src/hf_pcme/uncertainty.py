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

The code lives in :mod:`hf_pcme.uncertainty_binning` (uncertainty, vagueness, binned metrics,
failure AUROC), :mod:`hf_pcme.uncertainty_calibration` and :mod:`hf_pcme.uncertainty_report`
(one model's report, its JSON and plots); this module re-exports their public names.
"""

from __future__ import annotations

from .uncertainty_binning import (
    BINNED_METRICS,
    DIRECTIONS,
    BinnedMetrics,
    PerQueryMetrics,
    VaguenessCorrelation,
    binned_metrics,
    embedding_uncertainty,
    failure_auroc,
    per_query_metrics,
    uncertainty_bins,
    vagueness_correlation,
)
from .uncertainty_calibration import MAX_CALIBRATION_PAIRS, Calibration, calibration, calibration_pairs
from .uncertainty_report import (
    REPORT_FILE,
    SPECIFICITY_NAMES,
    UncertaintyReport,
    compute_uncertainty_report,
    format_uncertainty_report,
    plausible_counts,
    write_uncertainty_report,
)

__all__ = [
    "BINNED_METRICS",
    "DIRECTIONS",
    "MAX_CALIBRATION_PAIRS",
    "REPORT_FILE",
    "SPECIFICITY_NAMES",
    "BinnedMetrics",
    "Calibration",
    "PerQueryMetrics",
    "UncertaintyReport",
    "VaguenessCorrelation",
    "binned_metrics",
    "calibration",
    "calibration_pairs",
    "compute_uncertainty_report",
    "embedding_uncertainty",
    "failure_auroc",
    "format_uncertainty_report",
    "per_query_metrics",
    "plausible_counts",
    "uncertainty_bins",
    "vagueness_correlation",
    "write_uncertainty_report",
]
