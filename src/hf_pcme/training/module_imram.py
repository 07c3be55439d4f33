"""The training forward pass of IMRAM: local features of the local batch, gathered, B x B IMRAM scores, triplet loss.

IMRAM scores every image of the *global* batch with every caption (cross-attention over all B x B
pairs) and takes the VSE++ hardest-negative hinge loss in both directions (Chen et al., CVPR 2020,
following Faghri et al., BMVC 2018). Positives are the pairs with the same ``image_ids``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import gather_tensor
from ..modeling_imram import LocalFeatures
from ..outputs import LossOutput
from .module import EXTRA_TEXT_KEYS, positive_mask_from_ids


def gather_local_features(features: LocalFeatures) -> LocalFeatures:
    """Local features of all processes (with gradients); shorter captions are zero-padded with a False mask."""
    gathered = gather_tensor(features.features)
    mask = features.mask
    if mask is not None:
        mask = gather_tensor(mask.to(torch.uint8)).bool()  # padding from the gather is 0 = not a word
    return LocalFeatures(gathered, mask)


class IMRAMTrainingModule(nn.Module):
    """Wraps an :class:`~hf_pcme.IMRAMModel` for training with any number of processes (see the module docstring)."""

    def __init__(self, model: nn.Module, diagonal_positives_only: bool = False):
        super().__init__()
        self.model = model
        self.diagonal_positives_only = diagonal_positives_only

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
        images = gather_local_features(self.model.encode_images(pixel_values))
        texts = gather_local_features(self.model.encode_texts(input_ids, attention_mask, **text_kwargs))
        scores = self.model.score_all_pairs(images, texts)
        positive_mask = None
        if image_ids is not None and not self.diagonal_positives_only:
            positive_mask = positive_mask_from_ids(gather_tensor(image_ids))
        loss = self.model.compute_loss(scores, positive_mask)
        return LossOutput(loss=loss, components={"triplet": loss.detach()})


__all__ = ["IMRAMTrainingModule", "gather_local_features"]
