"""Test-side training callbacks (the production code has no test hooks; see hf_pcme.training.callbacks)."""

from __future__ import annotations

from hf_pcme.training.callbacks import StopTraining, TrainerCallback


class KillAfterSteps(TrainerCallback):
    """Ends the run after ``steps`` optimiser steps as a kill would: no final save, ``interrupted=True``."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, trainer, step: int) -> None:
        if step >= self.steps:
            raise StopTraining(f"killed after step {step}")
