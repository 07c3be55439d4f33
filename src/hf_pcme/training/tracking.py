"""Metric logging through accelerate trackers: TensorBoard when installed, else JSON lines.

``JsonLinesTracker`` is an ``accelerate`` :class:`~accelerate.tracking.GeneralTracker` that
appends one JSON object per ``accelerator.log`` call to ``<logging_dir>/metrics.jsonl``
(``{"step": 40, "train/loss": 1.23, ...}``) and writes the run configuration to
``<logging_dir>/config.json``; it needs nothing beyond the standard library.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker, on_main_process

METRICS_FILE = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonLinesTracker(GeneralTracker):
    """Append ``accelerator.log`` values to ``<logging_dir>/metrics.jsonl``, one JSON object per line."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | Path):
        # Nothing is written here: the tracker may be built before the Accelerator knows which
        # process is the main one; files are created by the (main-process-only) methods below.
        super().__init__()
        self.run_name = run_name
        self.logging_dir = Path(logging_dir)
        self.path = self.logging_dir / METRICS_FILE

    @property
    def tracker(self) -> Path:
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        self.logging_dir.mkdir(parents=True, exist_ok=True)
        (self.logging_dir / "config.json").write_text(json.dumps(values, indent=2, default=str), encoding="utf-8")

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        record = {"step": step, **{key: _jsonable(value) for key, value in values.items()}}
        self.logging_dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=str) + "\n")

    @on_main_process
    def truncate_after(self, step: int) -> None:
        """Drop records logged after ``step`` (a resumed run logs those steps again)."""
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip() and (json.loads(line).get("step") or 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def read_metrics(logging_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a :class:`JsonLinesTracker` log, oldest first."""
    path = Path(logging_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_trackers(kind: str, run_name: str, logging_dir: str | Path) -> list:
    """Trackers for ``Accelerator(log_with=...)``: ``"tensorboard"``, ``"jsonl"`` or ``"auto"`` (the first available).

    JSON lines are always written as well, so the run leaves a plain-text log.
    """
    if kind not in ("auto", "tensorboard", "jsonl"):
        raise ValueError(f"Unknown logging {kind!r}; valid choices are: auto, tensorboard, jsonl.")
    trackers: list = [JsonLinesTracker(run_name, logging_dir)]
    if kind == "tensorboard" and not tensorboard_available():
        raise ValueError("logging is 'tensorboard' but tensorboard is not installed; use 'auto' or 'jsonl'.")
    if kind in ("auto", "tensorboard") and tensorboard_available():
        trackers.append("tensorboard")
    return trackers


__all__ = ["JsonLinesTracker", "make_trackers", "read_metrics", "tensorboard_available"]
