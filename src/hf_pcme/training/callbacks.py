"""Callbacks: code of your own that :func:`~hf_pcme.training.train` runs during training.

Shaped like transformers' ``TrainerCallback``: subclass :class:`TrainerCallback`, override the
events you need, and pass instances as ``train(recipe, callbacks=[...])``.

- ``on_step_end(trainer, step)`` runs after every optimiser step (``step`` counts from 1 over the
  whole run), after that step's logging, evaluation and checkpoint. ``trainer`` is the running
  :class:`~hf_pcme.training.Trainer` (``trainer.model``, ``trainer.recipe``, ``trainer.output_dir``).

A callback stops the run by raising :class:`StopTraining`: the run ends at once, as a kill would
(no final checkpoint, model or card), and ``train`` returns a result with ``interrupted=True``;
``train(..., resume=True)`` later continues from the last checkpoint. Any other exception
propagates to the caller.

Example (stop after 100 steps)::

    class StopAfter(TrainerCallback):
        def __init__(self, steps):
            self.steps = steps

        def on_step_end(self, trainer, step):
            if step >= self.steps:
                raise StopTraining(f"stopped after {step} steps")

    result = train(recipe, callbacks=[StopAfter(100)])
"""

from __future__ import annotations

from typing import Any


class StopTraining(Exception):
    """Raise from a callback to end the run now, as a kill would (no final save; ``interrupted=True``)."""


class TrainerCallback:
    """Base class: every event does nothing; override the ones you need."""

    def on_step_end(self, trainer: Any, step: int) -> None:
        """After optimiser step ``step`` (1-based, whole run) and its logging / evaluation / checkpoint."""


__all__ = ["StopTraining", "TrainerCallback"]
