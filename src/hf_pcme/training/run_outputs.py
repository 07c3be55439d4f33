"""What a :class:`~hf_pcme.training.trainer.Trainer` run leaves behind: validation, the best model, checkpoints, the final export.

Periodic validation keeps the best model (by ``train.best_metric``) in ``output_dir/best``; the end of
the run saves model, processor, recipe, results and model card in ``output_dir`` and optionally
pushes them to the Hub.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .checkpointing import write_directory_atomically
from .evaluation import evaluate_model
from .model_card import write_model_card
from .run_state import BEST_DIR, RECIPE_FILE, RESULTS_FILE, TrainerState, TrainResult


class RunOutputs:
    """Mixin of :class:`~hf_pcme.training.trainer.Trainer` (uses its recipe, accelerator, model, processor and checkpoints)."""

    def evaluate(self) -> dict[str, float]:
        """R@K / PMRP (percent) of the current model on the validation split; ``{}`` without one."""
        if self.eval_split is None:
            return {}
        accelerator = self.accelerator
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        # Evaluation must not move the training RNG: a resumed run would diverge otherwise.
        with torch.random.fork_rng(devices=devices):
            metrics = evaluate_model(self.model, self.processor, self.eval_split, self.recipe, accelerator)
        if self.module is not None:
            self.module.train()
        return metrics

    def _evaluate_and_track(self, state: TrainerState) -> dict[str, float]:
        metrics = self.evaluate()
        state.last_eval_step = state.global_step
        state.last_metrics = metrics
        if not metrics:
            return metrics
        self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.global_step)
        key, train = self.recipe.train.best_metric, self.recipe.train
        if key not in metrics:
            raise ValueError(f"train.best_metric {key!r} is not an evaluation metric; choose one of: {', '.join(metrics)}.")
        value = metrics[key]
        better = state.best_metric is None or (
            value > state.best_metric if train.greater_is_better else value < state.best_metric
        )
        if better and math.isfinite(value):
            state.best_metric, state.best_step = value, state.global_step
            if self.accelerator.is_main_process:
                write_directory_atomically(self.output_dir / BEST_DIR, lambda folder: self._export(folder, metrics, state))
            self.accelerator.wait_for_everyone()
        return metrics

    def _export(self, folder: Path, metrics: dict[str, float], state: TrainerState) -> None:
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)
        results = {"step": state.global_step, "split": self.recipe.data.eval_split, "metrics": metrics}
        (folder / RESULTS_FILE).write_text(json.dumps(results, indent=2), encoding="utf-8")

    def _save_checkpoint(self, state: TrainerState) -> None:
        self.checkpoints.save(state.global_step, asdict(state))

    def _finish(self, state: TrainerState, push_to_hub: str | None) -> TrainResult:
        accelerator, train = self.accelerator, self.recipe.train
        metrics = state.last_metrics if state.last_eval_step == state.global_step else self._evaluate_and_track(state)
        self._save_checkpoint(state)
        best_dir = self.output_dir / BEST_DIR
        if train.load_best_at_end and (best_dir / RESULTS_FILE).exists():
            from ..modeling_pcme import PCMEModel

            best = PCMEModel.from_pretrained(best_dir)
            self.model.load_state_dict(best.state_dict())
            metrics = json.loads((best_dir / RESULTS_FILE).read_text(encoding="utf-8"))["metrics"]
        elapsed = time.perf_counter() - self._started
        summary = (
            f"{state.global_step} optimiser steps ({', '.join(str(p) for p in self._phase_lengths())} per phase) "
            f"in {elapsed / 60:.1f} min on {accelerator.num_processes} process(es) ({accelerator.device.type}); "
            f"global batch {train.batch_size} x {train.grad_accum} accumulation step(s)."
        )
        if accelerator.is_main_process:
            self._export(self.output_dir, metrics, state)
            self.recipe.save(self.output_dir / RECIPE_FILE)
            write_model_card(self.output_dir, self.recipe, metrics, repo_id=push_to_hub, training_summary=summary)
        accelerator.wait_for_everyone()
        if push_to_hub and accelerator.is_main_process:
            from ..hub import push_to_hub as push

            card = (self.output_dir / "README.md").read_text(encoding="utf-8")
            url = push(
                self.model, self.processor, push_to_hub, model_card=card,
                extra_files={RECIPE_FILE: self.output_dir / RECIPE_FILE, RESULTS_FILE: self.output_dir / RESULTS_FILE},
            )
            accelerator.print(f"Pushed to {url}")
        accelerator.wait_for_everyone()
        self._finish_trackers()
        return TrainResult(self.model, self.processor, metrics, self.output_dir, state.global_step, state.best_metric,
                           best_step=state.best_step)

    def _finish_trackers(self) -> None:
        # Not accelerator.end_training(): it also destroys the process group, and a caller may
        # train again (e.g. a baseline after the main model) in the same processes.
        for tracker in self.accelerator.trackers:
            tracker.finish()


__all__ = ["RunOutputs"]
