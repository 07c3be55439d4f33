"""The training forward pass of IMRAM: local features of the local batch, gathered, B x B IMRAM scores, triplet loss.

IMRAM scores every image of the *global* batch with every caption (cross-attention over all B x B
pairs) and takes the VSE++ hinge loss in both directions (Chen et al., CVPR 2020, following Faghri et
al., BMVC 2018): the hardest negative (``max_violation``, after ``hardest_negative_warmup_steps``
steps that sum over the negatives) or the sum over negatives. Positives are the pairs with the same
``image_ids`` (and, with ``duplicate_caption_positives``, the captions with the same text).

With ``mined_negatives = M > 0`` each query also gets M negatives drawn per step from its dual-encoder
top-K (:mod:`hf_pcme.training.mining_imram`): an image query's row of scores is its B in-batch
captions plus M mined captions, a caption query's row its B in-batch images plus M mined images.
Each process then takes the loss of its own queries only (the rows of the gathered batch that it
embedded), times the number of processes ``W``: the gather's backward sums the processes' losses and
DDP averages the gradients, so the gradient is that of the whole global batch on one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import gather_tensor, is_distributed
from ..loss_triplet import triplet_costs
from ..modeling_imram import LocalFeatures, l2_normalize
from ..outputs import LossOutput
from .augment import caption_keys, duplicate_caption_mask
from .mining_imram import MinedNegatives, mined_negatives_of
from .module import EXTRA_TEXT_KEYS, positive_mask_from_ids


def gather_local_features(features: LocalFeatures) -> LocalFeatures:
    """Local features of all processes (with gradients); shorter captions are zero-padded with a False mask."""
    gathered = gather_tensor(features.features)
    mask = features.mask
    if mask is not None:
        mask = gather_tensor(mask.to(torch.uint8)).bool()  # padding from the gather is 0 = not a word
    return LocalFeatures(gathered, mask)


class IMRAMTrainingModule(nn.Module):
    """Wraps an :class:`~hf_pcme.IMRAMModel` for training with any number of processes (see the module docstring).

    ``steps_seen`` (a buffer, saved in training checkpoints) counts the training forwards, for the warm-up.
    """

    def __init__(self, model: nn.Module, diagonal_positives_only: bool = False, negatives: MinedNegatives | None = None):
        super().__init__()
        self.model = model
        self.diagonal_positives_only = diagonal_positives_only
        self.negatives = negatives if negatives is not None else mined_negatives_of(model)
        if model.config.mined_negatives > 0 and self.negatives is None:
            raise ValueError("config.mined_negatives > 0 but no negatives were mined for this model: build it with "
                             "hf_pcme.training.builders_imram.build_imram_model (model.pretrained set).")
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    def hardest_negative_now(self) -> bool:
        config = self.model.config
        return bool(config.max_violation) and int(self.steps_seen) >= int(config.hardest_negative_warmup_steps)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        caption_ids: torch.Tensor | None = None,
        **batch: torch.Tensor,
    ) -> LossOutput:
        config = self.model.config
        max_violation = self.hardest_negative_now()
        if self.training:
            self.steps_seen += 1
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_kwargs = {key: batch[key] for key in EXTRA_TEXT_KEYS if key in batch}
        images = gather_local_features(self.model.encode_images(pixel_values))
        texts = gather_local_features(self.model.encode_texts(input_ids, attention_mask, **text_kwargs))
        scores = self.model.score_all_pairs(images, texts)
        positive_mask = None
        if image_ids is not None and not self.diagonal_positives_only:
            all_ids = gather_tensor(image_ids)
            if config.duplicate_caption_positives:
                positive_mask = duplicate_caption_mask(all_ids, gather_tensor(caption_keys(input_ids, attention_mask)))
            else:
                positive_mask = positive_mask_from_ids(all_ids)
        if self.negatives is None or config.mined_negatives == 0:
            loss = self._in_batch_loss(scores, positive_mask, max_violation)
            return LossOutput(loss=loss, components={"triplet": loss.detach()})
        if image_ids is None or caption_ids is None:
            raise ValueError("Mined negatives need the batch's image_ids and caption_ids (RetrievalCollator adds them).")
        if positive_mask is None:
            positive_mask = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
        rank = dist.get_rank() if is_distributed() else 0
        world = dist.get_world_size() if is_distributed() else 1
        local = gather_tensor(torch.full_like(image_ids, rank)) == rank  # the gathered rows this process embedded
        mined_captions, mined_images = self._mined_scores(image_ids, caption_ids, images.select(local), texts.select(local))
        margin = config.margin
        i2t = triplet_costs(torch.cat([scores[local], mined_captions], dim=1),
                            _pad_columns(positive_mask[local], mined_captions.shape[1]), margin, max_violation)
        t2i = triplet_costs(torch.cat([scores.t()[local], mined_images], dim=1),
                            _pad_columns(positive_mask.t()[local], mined_images.shape[1]), margin, max_violation)
        loss = (i2t.sum() + t2i.sum()) * world
        return LossOutput(loss=loss, components={"triplet": loss.detach(), "hardest_negative": torch.tensor(float(max_violation))})

    def _in_batch_loss(self, scores: torch.Tensor, positive_mask: torch.Tensor | None, max_violation: bool) -> torch.Tensor:
        if positive_mask is None:
            positive_mask = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
        from ..loss_triplet import bidirectional_triplet_loss

        return bidirectional_triplet_loss(scores.float(), positive_mask.bool(), self.model.config.margin, max_violation, "sum")

    def _mined_scores(
        self, image_ids: torch.Tensor, caption_ids: torch.Tensor, images: LocalFeatures, texts: LocalFeatures
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, M)`` IMRAM scores of each local image with M mined captions, and of each local caption with M mined images.

        Missing mined items (a query with fewer than K negatives) score ``-inf`` (never the hardest, no cost).
        """
        negatives, count = self.negatives, self.model.config.mined_negatives
        device = images.features.device
        caption_pool = negatives.image_to_captions[negatives.image_rows_of(image_ids)]  # (B, K) caption rows
        image_pool = negatives.caption_to_images[negatives.caption_rows_of(caption_ids)]  # (B, K) image rows
        caption_rows, image_rows = _draw(caption_pool, count), _draw(image_pool, count)  # (B, M), -1 = none

        words = negatives.input_ids[caption_rows.clamp_min(0).reshape(-1)]
        word_mask = negatives.attention_mask[caption_rows.clamp_min(0).reshape(-1)]
        length = int(word_mask.sum(1).max())
        mined_texts = self.model.encode_texts(words[:, :length].to(device), word_mask[:, :length].to(device))
        regions = negatives.region_features[image_rows.clamp_min(0).reshape(-1)].to(device, self.model.image_projection.weight.dtype)
        mined_images = LocalFeatures(l2_normalize(self.model.image_projection(regions)), None)

        batch = image_ids.shape[0]
        repeat = torch.arange(batch, device=device).repeat_interleave(count)
        with_captions = self.model.score_pairs(images.select(repeat), mined_texts).reshape(batch, count)
        with_images = self.model.score_pairs(mined_images, texts.select(repeat)).reshape(batch, count)
        with_captions = with_captions.masked_fill(caption_rows.to(device) < 0, -torch.inf)
        with_images = with_images.masked_fill(image_rows.to(device) < 0, -torch.inf)
        return with_captions, with_images


def _draw(pool: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` entries of each row of ``pool (B, K)`` drawn without replacement (global torch RNG)."""
    order = torch.rand(pool.shape, generator=None).argsort(dim=1)[:, :count]
    return pool.gather(1, order)


def _pad_columns(mask: torch.Tensor, extra: int) -> torch.Tensor:
    """``mask (N, M)`` with ``extra`` False columns appended (mined items are never positives)."""
    return torch.cat([mask.bool(), mask.new_zeros((mask.shape[0], extra), dtype=torch.bool)], dim=1)


__all__ = ["IMRAMTrainingModule", "gather_local_features"]
