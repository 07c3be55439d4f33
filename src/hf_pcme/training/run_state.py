"""What a training run is made of: its phases, the progress saved with each checkpoint, its result.

Also the names of what a run writes under ``output_dir`` (the trained model at the top level,
the best one in ``best/``, crash-safe ``checkpoints/``, tracker ``logs/``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Recipe

#: Sampler epochs of phase p are numbered p * EPOCH_STRIDE + epoch, so phases see different orders.
EPOCH_STRIDE = 100_000
BEST_DIR = "best"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
RESULTS_FILE = "eval_results.json"
RECIPE_FILE = "recipe.yaml"


@dataclass
class Phase:
    """One training phase: ``steps`` optimiser steps with ``frozen`` parts frozen, at learning rate ``lr``."""

    index: int
    steps: int
    frozen: list[str]
    lr: float
    steps_per_epoch: int = 0


@dataclass
class TrainerState:
    """Progress saved with every checkpoint (JSON)."""

    global_step: int = 0
    phase: int = 0
    phase_step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    last_eval_step: int | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainerState":
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained :class:`~hf_pcme.PCMEModel` (the best one if ``train.load_best_at_end``).
        processor: its :class:`~hf_pcme.PCMEProcessor`.
        metrics: the final validation metrics (flat, percent), empty without validation.
        output_dir: where the model, processor, card, logs and checkpoints are.
        global_step: optimiser steps done.
        best_metric: best value of ``train.best_metric`` seen, if any.
        interrupted: True when a callback stopped the run early (:class:`~hf_pcme.training.callbacks.StopTraining`).
        best_step: the step of ``best_metric`` (its model is in ``output_dir/best``), if any.
    """

    model: Any
    processor: Any
    metrics: dict[str, float]
    output_dir: Path
    global_step: int
    best_metric: float | None = None
    interrupted: bool = False
    best_step: int | None = None


def plan_phases(recipe: Recipe, steps_per_epoch: int) -> list[Phase]:
    """The two phases' lengths in optimiser steps (epochs x steps per epoch, or explicit steps, capped by ``max_steps``)."""
    train = recipe.train
    lengths = []
    for epochs, steps in ((train.phase1_epochs, train.phase1_steps), (train.phase2_epochs, train.phase2_steps)):
        lengths.append(steps if steps is not None else int(round(epochs * steps_per_epoch)))
    if train.max_steps is not None:
        lengths[0] = min(lengths[0], train.max_steps)
        lengths[1] = min(lengths[1], train.max_steps - lengths[0])
    return [
        Phase(0, lengths[0], list(train.phase1_frozen), train.lr, steps_per_epoch),
        Phase(1, lengths[1], [], train.lr * train.phase2_lr_multiplier, steps_per_epoch),
    ]


__all__ = [
    "BEST_DIR",
    "CHECKPOINT_DIR",
    "EPOCH_STRIDE",
    "LOG_DIR",
    "RECIPE_FILE",
    "RESULTS_FILE",
    "Phase",
    "TrainResult",
    "TrainerState",
    "plan_phases",
]
