"""The few lines a training run ends with: where the model is, what it scored, where to look next."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Validation metrics shown in the summary (when present), in this order.
SUMMARY_KEYS = ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "i2t_pmrp", "t2i_pmrp", "rsum")


def format_metrics(metrics: dict[str, float], keys: tuple[str, ...] = SUMMARY_KEYS) -> str:
    """``"i2t_R@1 52.00, t2i_R@1 19.60, rsum 354.90"``: the chosen keys that ``metrics`` has, in percent."""
    shown = [f"{key} {float(metrics[key]):.2f}" for key in keys if key in metrics]
    return ", ".join(shown) if shown else "none (no validation split)"


def run_summary(result: Any, recipe: Any, plots: list[str | Path] = ()) -> str:
    """A short report of a finished :func:`~hf_pcme.training.train` run.

    Args:
        result: the :class:`~hf_pcme.training.TrainResult`.
        recipe: its :class:`~hf_pcme.training.Recipe` (for the name of the best-model metric).
        plots: extra files to point at (e.g. the main job's uncertainty plot).
    """
    from .run_state import BEST_DIR, LOG_DIR, RESULTS_FILE

    output_dir = Path(result.output_dir)
    status = "stopped early" if result.interrupted else "finished"
    lines = [
        f"{recipe.name}: training {status} after {result.global_step} steps.",
        f"  model + processor: {output_dir}  (AutoModel / AutoProcessor.from_pretrained({str(output_dir)!r}))",
        f"  validation ({recipe.data.eval_split}, percent): {format_metrics(result.metrics)}",
    ]
    best_step = getattr(result, "best_step", None)
    if result.best_metric is not None and best_step is not None:
        lines.append(f"  best {recipe.train.best_metric} {result.best_metric:.2f} at step {best_step}: {output_dir / BEST_DIR}")
    lines.append(f"  model card: {output_dir / 'README.md'}; results: {output_dir / RESULTS_FILE}; logs: {output_dir / LOG_DIR}")
    for plot in plots:
        lines.append(f"  plot: {plot}")
    return "\n".join(lines)


__all__ = ["SUMMARY_KEYS", "format_metrics", "run_summary"]
