"""The optimisation loop of :class:`~hf_pcme.training.trainer.Trainer`: epochs of a phase, one optimiser step, what follows it.

Resumable mid-epoch: the epoch and the position in it follow from ``state.phase_step``, the sampler
and the rows are re-seeded per epoch, and the batches already seen are skipped (not re-drawn), so a
resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import contextlib

import torch

from .run_state import EPOCH_STRIDE, Phase, TrainerState


class StepLoop:
    """Mixin of :class:`~hf_pcme.training.trainer.Trainer` (uses its accelerator, module, optimiser, loader and callbacks)."""

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


__all__ = ["StepLoop"]
