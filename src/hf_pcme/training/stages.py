"""Multi-stage training (a recipe's ``stages:``): the webly supervised two-stage recipe and its kin.

Webly supervised joint embeddings (Mithun et al., ICMR 2018) first train on many web images whose
text is their user tags, then on a small set of images with clean captions. A recipe expresses
that as a list of stages, each with its own data, length, learning rate and frozen parts::

    stages:
      - {name: web,   data: {name: shapes_web, options: {num_images: 4000, seed: 1}}, epochs: 3}
      - {name: clean, data: {}, epochs: 10, lr: 5.0e-4}

:class:`StagedTrainer` is the :class:`~hf_pcme.training.trainer.Trainer` with one phase per stage:
stage ``k`` is phase ``k`` (its own optimiser and warmup + cosine schedule, sampler epochs
numbered ``k * EPOCH_STRIDE + epoch``), and checkpoints record the stage like a phase, so a run
killed in any stage resumes where it stopped and ends with the weights of an uninterrupted run.
What differs from two-phase training:

- every stage has its own training split (loaded, turned into rows and pixel-cached once, in
  ``setup``, and kept in memory for the whole run); the top-level ``data`` section names the
  evaluation split;
- the built-in bi-GRU's word-level vocabulary is built from the texts of **all** stages (tags and
  captions), in stage order, so no stage meets unknown words because of another;
- ``train.phase*`` keys are not used; ``train.max_steps`` still caps the total.
"""

from __future__ import annotations

import dataclasses

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from .builders import build_model, build_processor
from .config import Recipe, stage_data
from .data import load_splits, make_batch_sampler, make_training_rows, select_first_images
from .model_card import describe_stage_data
from .trainer import Phase, Trainer


def stage_recipes(recipe: Recipe) -> list[Recipe]:
    """One recipe per stage: the full recipe with the stage's data and no evaluation (that is the top level's)."""
    return [
        dataclasses.replace(
            recipe, data=stage_data(recipe, index), eval=dataclasses.replace(recipe.eval, enabled=False), stages=[]
        )
        for index in range(len(recipe.stages))
    ]


def plan_stages(recipe: Recipe, steps_per_epoch: list[int]) -> list[Phase]:
    """One phase per stage: ``steps``, or ``round(epochs * steps_per_epoch[k])``, capped by ``train.max_steps``."""
    phases, used = [], 0
    for index, (stage, per_epoch) in enumerate(zip(recipe.stages, steps_per_epoch)):
        steps = stage.steps if stage.steps is not None else int(round(stage.epochs * per_epoch))
        if recipe.train.max_steps is not None:
            steps = max(0, min(steps, recipe.train.max_steps - used))
        used += steps
        lr = recipe.train.lr if stage.lr is None else stage.lr
        phases.append(Phase(index, steps, list(stage.frozen), lr, per_epoch))
    return phases


class StagedTrainer(Trainer):
    """Runs a recipe's ``stages`` in order (see the module docstring)."""

    def setup(self) -> None:
        recipe, accelerator = self.recipe, self.accelerator
        if not recipe.stages:
            raise ValueError("StagedTrainer needs a recipe with 'stages'; use Trainer for two-phase recipes.")
        set_seed(recipe.seed)
        self.stage_recipes = stage_recipes(recipe)
        with accelerator.main_process_first():  # the first process builds the Arrow caches
            _, eval_split = load_splits(recipe)
            self.stage_splits = [load_splits(stage)[0] for stage in self.stage_recipes]
        self.eval_split = select_first_images(eval_split, recipe.eval.max_images) if eval_split is not None else None
        needs_captions = recipe.model.pretrained is None and recipe.model.tokenizer is None and recipe.model.text_tower is None
        captions = None
        if needs_captions:
            captions = [text for split in self.stage_splits for text in split.select_columns(["caption"])["caption"]]
        self.processor = build_processor(recipe, captions)
        self.model = build_model(recipe, self.processor.tokenizer)
        self.stage_rows = [
            make_training_rows(stage, split, self.processor, progress=accelerator.is_local_main_process)
            for stage, split in zip(self.stage_recipes, self.stage_splits)
        ]
        from ..data import RetrievalCollator

        self.collator = RetrievalCollator(self.processor, max_length=recipe.model.max_caption_length)
        self._use_stage(0)
        set_seed(recipe.seed, device_specific=True)

    def _use_stage(self, index: int) -> None:
        self.stage_index = index
        self.train_split = self.stage_splits[index]
        self.train_rows = self.stage_rows[index]

    def _make_train_loader(self) -> DataLoader:
        stage = self.stage_recipes[self.stage_index]
        return DataLoader(
            self.train_rows,
            batch_sampler=make_batch_sampler(stage, self.train_split),
            collate_fn=self.collator,
            num_workers=stage.data.num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.recipe.seed),
        )

    def _prepare_phase(self, phase: Phase) -> None:
        self._use_stage(phase.index)
        name = self.recipe.stages[phase.index].name or f"stage {phase.index + 1}"
        self.accelerator.print(
            f"Stage {phase.index + 1}/{len(self.recipe.stages)} ({name}): {phase.steps} steps on "
            f"{describe_stage_data(self.recipe, phase.index)}, lr {phase.lr:g}, frozen: {', '.join(phase.frozen) or 'none'}."
        )
        super()._prepare_phase(phase)

    def plan_phases(self) -> list[Phase]:
        current = getattr(self, "stage_index", 0)
        per_epoch = []
        for index in range(len(self.recipe.stages)):
            self._use_stage(index)
            per_epoch.append(self._steps_per_epoch())
        self._use_stage(current)
        return plan_stages(self.recipe, per_epoch)


__all__ = ["StagedTrainer", "plan_stages", "stage_recipes"]
