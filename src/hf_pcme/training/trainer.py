"""The training loop: accelerate-driven, two-phase, resumable, with periodic validation and a best model.

    from hf_pcme.training import load_recipe, train
    result = train(load_recipe("configs/shapes_pcme.yaml", ["train.max_steps=50"]))

What one run does (``accelerate launch`` with any number of processes, or plain ``python``):

1. builds the datasets, the processor (the bi-GRU's word-level tokenizer comes from the training
   captions) and the model the recipe names;
2. for each phase (towers frozen, then fine-tuned): a fresh optimiser (AdamP / AdamW) with warmup +
   cosine decay, then steps of ``grad_accum`` micro-batches of the *global* batch (each process
   embeds its slice; the loss sees the embeddings of all processes, gathered with gradients);
   gradient clipping and mixed precision through accelerate;
3. every ``log_every`` steps logs to the trackers (TensorBoard if installed, JSON lines always);
   every ``eval_every`` steps (and at the end) evaluates R@K / PMRP on the validation split and
   keeps the best model in ``output_dir/best``; every ``checkpoint_every`` steps, at the end of each
   phase and at the end, writes a crash-safe checkpoint (last ``keep_last`` kept);
4. at the end saves model + processor with ``save_pretrained`` into ``output_dir``, with the recipe,
   the evaluation results and a model card, and optionally pushes them to the Hub.

``train(recipe, resume=True)`` continues from the newest complete checkpoint: model, optimiser,
scheduler, RNG states, phase and position in the epoch; the final weights equal those of an
uninterrupted run (bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .adversarial import build_modality_classifier
from .callbacks import StopTraining, TrainerCallback
from .builders import build_model, build_processor, build_training_module, needs_training_captions
from .checkpointing import CheckpointManager, read_checkpoint_state, write_directory_atomically
from .config import Recipe
from .data import load_splits, make_batch_sampler, make_training_rows, select_first_images
from .evaluation import evaluate_model
from .model_card import write_model_card
from .optim import build_optimizer, build_scheduler, freeze_towers, freeze_uncertainty
from .tracking import JsonLinesTracker, make_trackers

logger = logging.getLogger(__name__)

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


def _cpu_only_multiprocess() -> bool:
    """Launched as several processes on a machine without GPUs: accelerate needs ``cpu=True`` to use gloo.

    Without it each process silently trains on its own (accelerate falls back to a single process).
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and not (
        hasattr(torch, "xpu") and torch.xpu.is_available()
    )


def _flat_config(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Tracker-friendly hyper-parameters: nested keys joined by '/', values as bool/int/float/str."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and prefix.count("/") < 1:
            flat.update(_flat_config(value, name + "/"))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


class Trainer:
    """Runs one recipe. Use :func:`train` unless you need the pieces (``setup``, ``evaluate``)."""

    def __init__(
        self, recipe: Recipe, accelerator: Accelerator | None = None, callbacks: list[TrainerCallback] | None = None
    ):
        self.recipe = recipe
        self.callbacks = list(callbacks or [])  # see training/callbacks.py
        self.output_dir = Path(recipe.output_dir)
        if accelerator is None:
            accelerator = Accelerator(
                cpu=_cpu_only_multiprocess(),
                mixed_precision=recipe.train.mixed_precision,
                log_with=make_trackers(recipe.logging, recipe.name, self.output_dir / LOG_DIR),
                project_config=ProjectConfiguration(
                    project_dir=str(self.output_dir), logging_dir=str(self.output_dir / LOG_DIR)
                ),
                # The recipe's batch_size is the global batch: each process gets a slice of it.
                dataloader_config=DataLoaderConfiguration(split_batches=True),
                step_scheduler_with_optimizer=False,
                kwargs_handlers=[
                    DistributedDataParallelKwargs(find_unused_parameters=recipe.train.find_unused_parameters)
                ],
            )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and accelerator.num_processes != launched:
            raise RuntimeError(
                f"Launched as {launched} processes but the Accelerator sees {accelerator.num_processes}: each process "
                "would train alone. On CPU pass Accelerator(cpu=True) (the Trainer does when no GPU is visible)."
            )
        if not accelerator.split_batches:
            raise ValueError("The Accelerator must use DataLoaderConfiguration(split_batches=True): "
                             "train.batch_size is the global batch.")
        if recipe.train.batch_size % accelerator.num_processes:
            raise ValueError(
                f"train.batch_size {recipe.train.batch_size} must be divisible by the number of processes "
                f"({accelerator.num_processes})."
            )
        self.accelerator = accelerator
        self.checkpoints = CheckpointManager(self.output_dir / CHECKPOINT_DIR, accelerator, recipe.train.keep_last)
        self.model = None
        self.processor = None
        self.module = None

    # ------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Build datasets, processor and model (identically on every process)."""
        recipe, accelerator = self.recipe, self.accelerator
        set_seed(recipe.seed)
        with accelerator.main_process_first():  # the first process builds the Arrow cache
            train_split, eval_split = load_splits(recipe)
        self.train_split = train_split
        self.eval_split = select_first_images(eval_split, recipe.eval.max_images) if eval_split is not None else None
        needs_captions = needs_training_captions(recipe)
        captions = train_split.select_columns(["caption"])["caption"] if needs_captions else None
        self.processor = build_processor(recipe, captions)
        self.model = build_model(recipe, self.processor.tokenizer, captions)
        if recipe.train.freeze_uncertainty:
            freeze_uncertainty(self.model)
        self.modality_classifier = build_modality_classifier(recipe, self.model.config.embed_dim)
        self.train_rows = make_training_rows(
            recipe, train_split, self.processor, progress=accelerator.is_local_main_process
        )
        from ..data import RetrievalCollator

        self.collator = RetrievalCollator(self.processor, max_length=recipe.model.max_caption_length)
        # Different sampling noise on each process from here on (the model is identical everywhere).
        set_seed(recipe.seed, device_specific=True)

    def _make_train_loader(self) -> DataLoader:
        return DataLoader(
            self.train_rows,
            batch_sampler=make_batch_sampler(self.recipe, self.train_split),
            collate_fn=self.collator,
            num_workers=self.recipe.data.num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
            # Creating a loader iterator draws a worker base seed; from its own generator, not the
            # global RNG, so that re-creating an iterator on resume leaves the model's noise unchanged.
            generator=torch.Generator().manual_seed(self.recipe.seed),
        )

    def _prepare_phase(self, phase: Phase) -> None:
        """Freeze / unfreeze, and give the phase a fresh optimiser, schedule, DDP wrapper and loader."""
        accelerator, train = self.accelerator, self.recipe.train
        accelerator.free_memory()  # drop the previous phase's wrappers (and DDP's gradient hooks)
        self.module = self.optimizer = self.scheduler = self.train_loader = None
        freeze_towers(self.model, phase.frozen)
        classifier = getattr(self, "modality_classifier", None)
        module = build_training_module(self.model, train, processor=self.processor, modality_classifier=classifier)
        optimizer = build_optimizer(
            self.model, phase.lr, train.weight_decay, train.tower_lr_multiplier, train.optimizer,
            uncertainty_lr_multiplier=train.uncertainty_lr_multiplier,
        )
        if classifier is not None:  # trained with the model, saved only in the training checkpoints
            optimizer.add_param_group({"params": list(classifier.parameters()), "lr": phase.lr, "weight_decay": 0.0})
        scheduler = build_scheduler(optimizer, phase.steps, train.warmup_steps, train.min_lr_ratio)
        self.module, self.optimizer, self.scheduler, self.train_loader = accelerator.prepare(
            module, optimizer, scheduler, self._make_train_loader()
        )

    # ------------------------------------------------------------------------------------ loop
    def train(self, resume: bool = False, push_to_hub: str | None = None) -> TrainResult:
        recipe, accelerator = self.recipe, self.accelerator
        if self.model is None:
            self.setup()
        state = TrainerState()
        resume_from = self.checkpoints.latest() if resume else None
        if resume and resume_from is None:
            accelerator.print(f"No complete checkpoint in {self.checkpoints.directory}; starting from scratch.")
        if resume_from is not None:
            state = TrainerState.from_dict(read_checkpoint_state(resume_from))
            accelerator.print(f"Resuming from {resume_from} (step {state.global_step}, phase {state.phase + 1}).")

        phases = self.plan_phases()
        total_steps = sum(p.steps for p in phases)

        accelerator.init_trackers(recipe.name, config=_flat_config(recipe.to_dict()))
        if resume_from is not None:
            for tracker in accelerator.trackers:
                if isinstance(tracker, JsonLinesTracker):
                    tracker.truncate_after(state.global_step)
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            recipe.save(self.output_dir / RECIPE_FILE)

        self.progress = tqdm(
            total=total_steps, initial=state.global_step, desc=recipe.name,
            # disable=None: a bar on a terminal only; otherwise _after_step prints a line every log_every steps
            disable=None if accelerator.is_local_main_process else True, dynamic_ncols=True,
        )
        self._started = time.perf_counter()
        try:
            for phase in phases:
                if phase.steps == 0 or phase.index < state.phase:
                    continue
                self._prepare_phase(phase)
                if resume_from is not None and phase.index == state.phase:
                    self.checkpoints.load(resume_from)
                    resume_from = None
                else:
                    state.phase, state.phase_step = phase.index, 0
                self._run_phase(phase, state, phase.steps_per_epoch)
                self._save_checkpoint(state)  # phase boundaries are always resumable
            if resume_from is not None:
                raise ValueError(
                    f"Cannot resume from {resume_from}: it was saved in phase {state.phase + 1}, which this recipe "
                    "no longer has (phase lengths changed?)."
                )
        except StopTraining:
            self.progress.close()
            self._finish_trackers()
            return TrainResult(self.model, self.processor, dict(state.last_metrics), self.output_dir,
                               state.global_step, state.best_metric, interrupted=True)
        self.progress.close()
        return self._finish(state, push_to_hub)

    def _run_phase(self, phase: Phase, state: TrainerState, steps_per_epoch: int) -> None:
        accelerator, train = self.accelerator, self.recipe.train
        self.module.train()
        self.progress.set_description(f"{self.recipe.name} phase {phase.index + 1}")
        while state.phase_step < phase.steps:
            epoch, done_in_epoch = divmod(state.phase_step, steps_per_epoch)
            sampler_epoch = phase.index * EPOCH_STRIDE + epoch
            self.train_loader.set_epoch(sampler_epoch)
            self.train_rows.set_epoch(sampler_epoch)
            loader = self.train_loader
            if done_in_epoch:
                loader = accelerator.skip_first_batches(self.train_loader, done_in_epoch * train.grad_accum)
            batches = iter(loader)
            for _ in range(done_in_epoch, steps_per_epoch):
                if state.phase_step >= phase.steps:
                    break
                logs = self._optimizer_step(batches)
                state.phase_step += 1
                state.global_step += 1
                self.progress.update(1)
                self._after_step(state, logs)
            del batches

    def _optimizer_step(self, batches) -> dict[str, torch.Tensor]:
        accelerator, train = self.accelerator, self.recipe.train
        totals: dict[str, torch.Tensor] = {}
        for micro in range(train.grad_accum):
            batch = next(batches)
            last = micro == train.grad_accum - 1
            # Only the last micro-batch all-reduces gradients (DDP no_sync for the others).
            with contextlib.nullcontext() if last else accelerator.no_sync(self.module):
                output = self.module(**batch)
                accelerator.backward(output.loss / train.grad_accum)
            totals["loss"] = totals.get("loss", 0) + output.loss.detach().float() / train.grad_accum
            for name, value in (output.components or {}).items():
                if torch.is_tensor(value) and value.numel() == 1:
                    totals[name] = totals.get(name, 0) + value.detach().float() / train.grad_accum
        totals["lr"] = torch.tensor(self.scheduler.get_last_lr()[0])  # the rate this step uses
        if train.grad_clip is not None:
            totals["grad_norm"] = accelerator.clip_grad_norm_(
                [p for group in self.optimizer.param_groups for p in group["params"]], train.grad_clip
            )
        self.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule aligned
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def _after_step(self, state: TrainerState, logs: dict[str, torch.Tensor]) -> None:
        train, step = self.recipe.train, state.global_step
        if step % train.log_every == 0:
            values = {f"train/{k}": float(v) for k, v in logs.items()}
            values["train/phase"] = state.phase + 1
            self.accelerator.log(values, step=step)
            self.progress.set_postfix(loss=f"{values['train/loss']:.4g}", refresh=False)
            if self.progress.disable and self.accelerator.is_local_main_process:
                print(f"{self.recipe.name}: step {step}/{self.progress.total} loss {values['train/loss']:.4g}", flush=True)
        if train.eval_every and step % train.eval_every == 0:
            self._evaluate_and_track(state)
        if step % train.checkpoint_every == 0:
            self._save_checkpoint(state)
        for callback in self.callbacks:
            callback.on_step_end(self, step)

    # ------------------------------------------------------------------------------------ eval / save
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

    def _steps_per_epoch(self) -> int:
        """Optimiser steps in one epoch of the current training data."""
        train = self.recipe.train
        micro_batches = len(self._make_train_loader())
        steps_per_epoch = micro_batches // train.grad_accum
        if steps_per_epoch < 1:
            raise ValueError(
                f"One epoch has {micro_batches} global batches of {train.batch_size}, fewer than "
                f"train.grad_accum={train.grad_accum}: lower the batch size or the accumulation."
            )
        return steps_per_epoch

    def plan_phases(self) -> list[Phase]:
        """This run's phases with their lengths in optimiser steps (:func:`plan_phases`)."""
        return plan_phases(self.recipe, self._steps_per_epoch())

    def _phase_lengths(self) -> list[int]:
        return [p.steps for p in self.plan_phases()]


def train(
    recipe: Recipe,
    resume: bool = False,
    push_to_hub: str | None = None,
    accelerator: Accelerator | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> TrainResult:
    """Train the model a recipe describes; see the module docstring. ``resume`` continues the latest checkpoint.

    A recipe with ``stages`` runs them in order (:class:`~hf_pcme.training.stages.StagedTrainer`).
    ``callbacks``: :class:`~hf_pcme.training.callbacks.TrainerCallback` instances (``on_step_end``; one
    may raise :class:`~hf_pcme.training.callbacks.StopTraining` to end the run as a kill would).
    """
    if recipe.stages:
        from .stages import StagedTrainer

        return StagedTrainer(recipe, accelerator, callbacks).train(resume=resume, push_to_hub=push_to_hub)
    return Trainer(recipe, accelerator, callbacks).train(resume=resume, push_to_hub=push_to_hub)


__all__ = ["Phase", "TrainResult", "Trainer", "TrainerState", "plan_phases", "train"]
