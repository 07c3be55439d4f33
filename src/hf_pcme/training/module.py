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
    """

    def __init__(
        self, model: nn.Module, diagonal_positives_only: bool = False, modality_classifier: nn.Module | None = None
    ):
        super().__init__()
        self.model = model
        self.diagonal_positives_only = diagonal_positives_only
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
        image_embeds = gather_embeddings(self.model.get_image_features(pixel_values))
        text_embeds = gather_embeddings(self.model.get_text_features(input_ids, attention_mask, **text_kwargs))
        positive_mask = None
        if image_ids is not None and not self.diagonal_positives_only:
            all_ids = gather_tensor(image_ids)
            positive_mask = positive_mask_from_ids(all_ids)
        output = self.model.compute_loss(image_embeds, text_embeds, positive_mask=positive_mask, labels=gather_tensor(labels))
        if self.modality_classifier is None:
            return output
        adversarial = self.modality_classifier(image_embeds, text_embeds)
        components = {**(output.components or {}), **{k: v.detach() for k, v in adversarial.items()}}
        return LossOutput(loss=output.loss + adversarial["modality_classifier"], components=components)


__all__ = ["ContrastiveTrainingModule", "positive_mask_from_ids"]
