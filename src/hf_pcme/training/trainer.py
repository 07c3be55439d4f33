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

This module sets the run up (accelerator, data, model, phases); the step loop is in
:mod:`.step_loop`, validation / checkpoints / export in :mod:`.run_outputs`, the phases and the
saved progress in :mod:`.run_state`.
"""

from __future__ import annotations

import json
import logging
import os
import time
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
from .checkpointing import CheckpointManager, read_checkpoint_state
from .config import Recipe
from .data import load_splits, make_batch_sampler, make_training_rows, select_first_images
from .optim import build_optimizer, build_scheduler, freeze_towers, freeze_uncertainty
from .run_outputs import RunOutputs
from .run_state import (  # noqa: F401 - BEST_DIR, LOG_DIR, RESULTS_FILE, EPOCH_STRIDE: re-exported for callers
    BEST_DIR,
    CHECKPOINT_DIR,
    EPOCH_STRIDE,
    LOG_DIR,
    RECIPE_FILE,
    RESULTS_FILE,
    Phase,
    TrainerState,
    TrainResult,
    plan_phases,
)
from .step_loop import StepLoop
from .tracking import JsonLinesTracker, make_trackers

logger = logging.getLogger(__name__)

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


class Trainer(StepLoop, RunOutputs):
    """Runs one recipe. Use :func:`train` unless you need the pieces (``setup``, ``evaluate``).

    The step loop is :class:`~hf_pcme.training.step_loop.StepLoop`; validation, checkpoints and the
    final export are :class:`~hf_pcme.training.run_outputs.RunOutputs`.
    """

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
