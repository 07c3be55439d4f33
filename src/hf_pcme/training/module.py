"""The training forward pass: embed the local batch, gather it across processes, loss on the global batch.

It is one ``nn.Module`` so that DDP (through ``accelerator.prepare``) sees a single forward that
uses every trainable parameter, including the match scale ``a`` and shift ``b`` that only the
loss touches.
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import gather_embeddings, gather_tensor
from ..outputs import LossOutput
from .augment import caption_keys, drop_words, duplicate_caption_mask, mix_images
from .optim import apply_frozen_eval_mode

#: Batch keys passed on to the text tower besides ``input_ids`` / ``attention_mask``.
EXTRA_TEXT_KEYS = ("token_type_ids",)


def positive_mask_from_ids(image_ids: torch.Tensor, text_image_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``(N, M)`` bool mask, true where caption j describes image i (same image id).

    With pairs ``(image_i, caption_i)`` in a batch, two captions of the same image are both
    positives of that image, unlike the original PCME, which counts only the diagonal.
    """
    text_image_ids = image_ids if text_image_ids is None else text_image_ids
    return image_ids.reshape(-1, 1) == text_image_ids.reshape(1, -1)


class ContrastiveTrainingModule(nn.Module):
    """Wraps a :class:`~hf_pcme.PCMEModel` for training with any number of processes.

    ``forward(pixel_values, input_ids, attention_mask, image_ids=None, labels=None)`` embeds the
    local pairs, gathers the embeddings of all processes with gradients (see
    :mod:`hf_pcme.distributed`), and returns the model's loss on the global batch as a
    :class:`~hf_pcme.LossOutput`. Positives are the pairs with the same ``image_ids`` unless
    ``diagonal_positives_only`` (the original PCME) or no ids are given.

    Options that give the uncertainty a training signal (all off by default; see
    :mod:`.augment`): ``duplicate_caption_positives`` (identical caption text = positives of each
    other's images), ``duplicate_caption_inclusion`` (the same, for the inclusion term of the
    ``prolip`` loss only: a caption's Gaussian must contain every image whose caption has its text,
    while the matching loss keeps the usual positives), ``mix_batch_ratio`` (PCME++ mixup / cutmix of that fraction of the images with
    soft targets; losses that take ``soft_targets``), ``partial_caption_ratio`` (that fraction of the
    captions is also embedded word-dropped, each word removed with ``word_drop_prob``, and passed to
    the loss as ``partial_text`` / ``partial_source`` for ProLIP's inclusion loss).
    """

    def __init__(
        self,
        model: nn.Module,
        diagonal_positives_only: bool = False,
        *,
        duplicate_caption_positives: bool = False,
        duplicate_caption_inclusion: bool = False,
        mix_batch_ratio: float = 0.0,
        partial_caption_ratio: float = 0.0,
        word_drop_prob: float = 0.5,
        protected_token_ids: tuple[int, ...] = (),
        modality_classifier: nn.Module | None = None,
    ):
        super().__init__()
        self.model = model
        self.diagonal_positives_only = diagonal_positives_only
        self.duplicate_caption_positives = duplicate_caption_positives
        self.duplicate_caption_inclusion = duplicate_caption_inclusion
        self.mix_batch_ratio = mix_batch_ratio
        self.partial_caption_ratio = partial_caption_ratio
        self.word_drop_prob = word_drop_prob
        self.protected_token_ids = tuple(protected_token_ids)
        # GPLDAN's adversarial modality classifier (training only; see .adversarial): part of the
        # training state (accelerate checkpoints), never of the saved model.
        self.modality_classifier = modality_classifier

    def train(self, mode: bool = True) -> "ContrastiveTrainingModule":
        super().train(mode)
        if mode:
            apply_frozen_eval_mode(self.model)
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **batch: torch.Tensor,
    ) -> LossOutput:
        text_kwargs = {key: batch[key] for key in EXTRA_TEXT_KEYS if key in batch}
        full_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        positive_mask = None
        if image_ids is not None and not self.diagonal_positives_only:
            all_ids = gather_tensor(image_ids)
            if self.duplicate_caption_positives:
                positive_mask = duplicate_caption_mask(all_ids, gather_tensor(caption_keys(input_ids, full_mask)))
            else:
                positive_mask = positive_mask_from_ids(all_ids)
        loss_inputs = {}
        if self.duplicate_caption_inclusion and image_ids is not None:
            # Only the inclusion term sees identical texts as covering each other's images: the matching
            # loss keeps its positives, so a vague caption is widened without being pulled onto every image.
            loss_inputs["inclusion_mask"] = duplicate_caption_mask(
                gather_tensor(image_ids), gather_tensor(caption_keys(input_ids, full_mask))
            )
        if self.mix_batch_ratio:
            if not is_single_process():  # the soft targets would need the partners of other processes
                raise ValueError("train.mix_batch_ratio is only supported in a single process.")
            mask = positive_mask if positive_mask is not None else torch.eye(
                input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            pixel_values, soft_targets = mix_images(pixel_values, mask, self.mix_batch_ratio)
            loss_inputs["soft_targets"] = soft_targets
        text_local = self.model.get_text_features(input_ids, attention_mask, **text_kwargs)
        image_embeds = gather_embeddings(self.model.get_image_features(pixel_values))
        text_embeds = gather_embeddings(text_local)
        num_partial = int(round(self.partial_caption_ratio * input_ids.shape[0]))
        if num_partial:
            partial_ids, partial_mask = drop_words(
                input_ids[:num_partial], full_mask[:num_partial], self.word_drop_prob, self.protected_token_ids
            )
            partial_kwargs = {key: value[:num_partial] for key, value in text_kwargs.items()}
            partial = self.model.get_text_features(partial_ids, partial_mask, **partial_kwargs)
            loss_inputs["partial_text"] = gather_embeddings(partial)
            loss_inputs["partial_source"] = gather_embeddings(text_local.select(slice(0, num_partial)))
        output = self.model.compute_loss(
            image_embeds, text_embeds, positive_mask=positive_mask, labels=gather_tensor(labels), **loss_inputs
        )
        if self.modality_classifier is None:
            return output
        adversarial = self.modality_classifier(image_embeds, text_embeds)
        components = {**(output.components or {}), **{k: v.detach() for k, v in adversarial.items()}}
        return LossOutput(loss=output.loss + adversarial["modality_classifier"], components=components)


def is_single_process() -> bool:
    """True unless torch.distributed runs with more than one process."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1)


__all__ = ["ContrastiveTrainingModule", "positive_mask_from_ids"]
