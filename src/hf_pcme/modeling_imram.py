"""IMRAMModel: iterative cross-attention matching of image regions and words, a re-ranker for a dual encoder.

Reference: Chen, Ding, Lin, Zhao & Han, "IMRAM: Iterative Matching with Recurrent Attention Memory
for Cross-Modal Image-Text Retrieval", CVPR 2020; its attention unit is SCAN's (Lee et al.,
"Stacked Cross Attention for Image-Text Matching", ECCV 2018).

A pair (image, caption) is scored from *local* features: the image's regions ``v_1..v_R`` (here the
cells of the vision tower's feature map, or its patch tokens) and the caption's words ``w_1..w_L``
(the text tower's token outputs), each projected by a linear layer to a common size D and
l2-normalised. With queries ``x_1..x_n`` of one modality and context ``y_1..y_m`` of the other:

Cross-modal attention unit (SCAN, IMRAM eq. 2-3)::

    s_ij  = cos(x_i, y_j)
    s'_ij = LeakyReLU_0.1(s_ij) / sqrt(sum_i LeakyReLU_0.1(s_ij)^2)     (normalised over the queries)
    a_ij  = softmax_j(lambda * s'_ij)
    c_i   = sum_j a_ij y_j                                               (attended context of x_i)

Memory distillation unit (IMRAM eq. 4-6), shared by the K steps of one direction::

    g    = sigmoid(W_g [x_i; c_i] + b_g)
    o    = tanh(W_o [x_i; c_i] + b_o)
    x_i' = l2norm(g * x_i + (1 - g) * o)

Pair score (IMRAM eq. 7-8): at step k = 1..K the queries attend, the step similarity is
``F_k = mean_i cos(x_i^k, c_i^k)``, the queries are updated by the memory unit, and
``S(I, T) = sum_k F_k``. Text-IMRAM uses the words as queries (over regions), Image-IMRAM the
regions (over words), full IMRAM the sum of both.

Departures from the paper: regions are feature-map cells of the dual encoder's CNN (or patch tokens),
not Faster R-CNN detections; the words come from the dual encoder's text tower (bi-GRU, BERT, ...)
through one linear projection; the towers can be shared with (and frozen as in) a trained
:class:`PCMEModel`, so IMRAM only re-ranks that dual encoder's top-K. The final l2-normalisation of
the updated queries is what the authors' code does by default (it is not in the paper's equations).
Training (:meth:`IMRAMModel.compute_loss`) is the paper's hardest-negative triplet loss by default;
``max_violation=False`` sums over all negatives instead (the shapes recipe uses it: on frozen towers
the hardest-negative loss collapsed to equal scores for every pair).
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_imram import IMRAMConfig
from .distances import iter_row_chunks
from .loss_triplet import bidirectional_triplet_loss
from .modeling_pcme import StrictLoadingMixin, build_tower, tower_feature_dim, tower_local_and_global

#: Pairs scored at once by :meth:`IMRAMModel.score_all_pairs` (bounds the (pairs, L, R) attention).
PAIR_CHUNK_SIZE = 4096

_EPS = 1e-8


@dataclass
class LocalFeatures(ModelOutput):
    """Projected, l2-normalised local features of a batch: ``features (B, L, D)``, ``mask (B, L)`` (True = real).

    ``mask`` is ``None`` when every position is real (image regions).
    """

    features: torch.FloatTensor | None = None
    mask: torch.BoolTensor | None = None

    def select(self, rows: Any) -> "LocalFeatures":
        """The rows ``rows`` (an index tensor or a slice) of the batch."""
        return LocalFeatures(self.features[rows], None if self.mask is None else self.mask[rows])


def concat_local_features(parts: list[LocalFeatures]) -> LocalFeatures:
    """Concatenate batches of local features padded to different lengths (zero features, mask False)."""
    length = max(part.features.shape[1] for part in parts)
    features, masks = [], []
    for part in parts:
        batch, size, _ = part.features.shape
        pad = length - size
        features.append(F.pad(part.features, (0, 0, 0, pad)))
        mask = part.mask if part.mask is not None else torch.ones(batch, size, dtype=torch.bool, device=part.features.device)
        masks.append(F.pad(mask, (0, pad), value=False))
    mask = torch.cat(masks)
    keep_mask = any(part.mask is not None for part in parts) or not bool(mask.all())
    return LocalFeatures(torch.cat(features), mask if keep_mask else None)


@dataclass
class IMRAMOutput(ModelOutput):
    """Output of :meth:`IMRAMModel.forward`.

    Args:
        loss: hardest-negative triplet loss over the batch (when ``return_loss=True``).
        logits_per_image: ``(N_img, N_txt)`` IMRAM scores ``S(I, T)`` (sum over the K steps, and
            over both directions for the full variant), higher = better match.
        logits_per_text: its transpose.
        step_scores: ``(N_img, N_txt, K)`` the per-step similarities ``F_k`` (summed over directions).
        image_features / text_features: the :class:`LocalFeatures` that were aligned.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    step_scores: torch.FloatTensor | None = None
    image_features: LocalFeatures | None = None
    text_features: LocalFeatures | None = None


def l2_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True).clamp_min(_EPS)


def cross_attention(
    query: torch.Tensor,
    context: torch.Tensor,
    *,
    query_mask: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    temperature: float = 10.0,
    leaky_relu_slope: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SCAN's attention unit: each query attends over the context. Returns ``(attended (P, n, D), weights (P, n, m))``.

    ``query (P, n, D)`` and ``context (P, m, D)`` are P aligned pairs; masks are ``(P, n)`` / ``(P, m)``
    bool, True = real position. ``s_ij = cos(x_i, y_j)``, clipped by LeakyReLU, l2-normalised over the
    (real) queries i, ``a_ij = softmax_j(lambda s'_ij)`` over the (real) context j, ``c_i = sum_j a_ij y_j``.
    Computed in float32 (the softmax of lambda-scaled scores).
    """
    query32, context32 = l2_normalize(query.float()), l2_normalize(context.float())
    similarity = F.leaky_relu(query32 @ context32.transpose(1, 2), negative_slope=leaky_relu_slope)
    if query_mask is not None:
        similarity = similarity.masked_fill(~query_mask.unsqueeze(2), 0.0)
    similarity = similarity / similarity.norm(dim=1, keepdim=True).clamp_min(_EPS)
    logits = temperature * similarity
    if context_mask is not None:
        logits = logits.masked_fill(~context_mask.unsqueeze(1), float("-inf"))
    weights = torch.softmax(logits, dim=2)
    attended = weights @ context.float()
    return attended.to(query.dtype), weights


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the last dim of ``values (P, n)``, over the positions where ``mask`` is True."""
    if mask is None:
        return values.mean(dim=-1)
    weights = mask.to(values.dtype)
    return (values * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)


class MemoryDistillationUnit(nn.Module):
    """IMRAM's gated memory update: ``x' = l2norm(g * x + (1 - g) * o)``, ``g = sigmoid(W_g[x; c])``, ``o = tanh(W_o[x; c])``."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(2 * dim, dim)
        self.candidate = nn.Linear(2 * dim, dim)

    def forward(self, query: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        both = torch.cat([query, attended], dim=-1)
        gate = torch.sigmoid(self.gate(both))
        candidate = torch.tanh(self.candidate(both))
        return l2_normalize(gate * query + (1.0 - gate) * candidate)


class IMRAMPreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    config_class = IMRAMConfig
    config: IMRAMConfig
    base_model_prefix = "imram"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")


class IMRAMModel(IMRAMPreTrainedModel):
    """Image tower + text tower (own, or shared with a dual encoder) + projections + IMRAM matching units.

    Use :meth:`from_dual_encoder` to build one on a trained :class:`PCMEModel`'s towers,
    :meth:`encode_images` / :meth:`encode_texts` for local features, :meth:`score_pairs` for aligned
    pairs (re-ranking) and :meth:`score_all_pairs` for every pair of two sets.
    """

    def __init__(
        self,
        config: IMRAMConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else build_tower(config.vision_config)
        self.text_model = text_model if text_model is not None else build_tower(config.text_config)
        self.image_projection = nn.Linear(tower_feature_dim(config.vision_config), config.embed_dim)
        self.text_projection = nn.Linear(tower_feature_dim(config.text_config), config.embed_dim)
        # Only the directions the variant uses get a memory unit (DDP needs every parameter used).
        self.text_memory = MemoryDistillationUnit(config.embed_dim) if config.variant in ("text", "full") else None
        self.image_memory = MemoryDistillationUnit(config.embed_dim) if config.variant in ("image", "full") else None
        for tower in self._frozen_towers():
            tower.requires_grad_(False)
        self.post_init()
        self.train(self.training)  # frozen towers start in eval mode too

    @classmethod
    def from_dual_encoder(
        cls,
        pcme_model: PreTrainedModel | str | os.PathLike,
        frozen_towers: tuple[str, ...] | list[str] = ("vision", "text"),
        **config_kwargs: Any,
    ) -> "IMRAMModel":
        """An IMRAM matcher on the towers of a :class:`PCMEModel` (an instance or a saved folder / hub id).

        Frozen towers are shared (the same modules) and stay fixed (in eval mode); a tower left out of
        ``frozen_towers`` is copied, so training it leaves the dual encoder unchanged.
        ``config_kwargs`` are :class:`IMRAMConfig` fields.
        """
        if isinstance(pcme_model, (str, os.PathLike)):
            from .modeling_pcme import PCMEModel

            source = str(pcme_model)
            pcme_model = PCMEModel.from_pretrained(pcme_model)
        else:
            source = getattr(pcme_model, "name_or_path", None) or None
        for name in ("vision_model", "text_model"):
            if not isinstance(getattr(pcme_model, name, None), nn.Module):
                raise ValueError(f"pcme_model must be a PCMEModel (with vision_model and text_model), got {type(pcme_model).__name__}.")
        config_kwargs.setdefault("dual_encoder", source)
        config = IMRAMConfig(
            vision_config=pcme_model.config.vision_config,
            text_config=pcme_model.config.text_config,
            frozen_towers=list(frozen_towers),
            **config_kwargs,
        )
        towers = {
            name: module if name in config.frozen_towers else copy.deepcopy(module)
            for name, module in (("vision", pcme_model.vision_model), ("text", pcme_model.text_model))
        }
        return cls(config, vision_model=towers["vision"], text_model=towers["text"])

    def train(self, mode: bool = True) -> "IMRAMModel":
        super().train(mode)
        for tower in self._frozen_towers():  # frozen towers keep their BatchNorm statistics and no dropout
            tower.eval()
        return self

    def _frozen_towers(self) -> list[nn.Module]:
        return [getattr(self, f"{name}_model") for name in self.config.frozen_towers]

    # ------------------------------------------------------------------ encoding
    def _tower_context(self, name: str):
        return torch.no_grad() if name in self.config.frozen_towers else contextlib.nullcontext()

    def encode_images(self, pixel_values: torch.FloatTensor) -> LocalFeatures:
        """Regions of ``pixel_values (B, 3, H, W)``: the tower's grid cells / patches, projected and l2-normalised ``(B, R, D)``."""
        if pixel_values is None or pixel_values.dim() != 4:
            shape = None if pixel_values is None else tuple(pixel_values.shape)
            raise ValueError(f"pixel_values must be a (batch, channels, height, width) tensor, got {shape}.")
        with self._tower_context("vision"):
            local, _, _ = tower_local_and_global(self.vision_model(pixel_values=pixel_values))
        return LocalFeatures(l2_normalize(self.image_projection(local)), None)

    def encode_texts(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **text_kwargs: Any
    ) -> LocalFeatures:
        """Words of ``input_ids (B, L)``: the tower's token outputs, projected and l2-normalised ``(B, L, D)`` + mask."""
        if input_ids is None or input_ids.dim() != 2:
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"input_ids must be a (batch, length) tensor, got {shape}.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with self._tower_context("text"):
            outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, **text_kwargs)
            local, _, mask = tower_local_and_global(outputs, attention_mask)
        return LocalFeatures(l2_normalize(self.text_projection(local)), mask)

    # ------------------------------------------------------------------ scoring
    def _iterate(
        self, memory: MemoryDistillationUnit, query: torch.Tensor, query_mask, context: torch.Tensor, context_mask
    ) -> torch.Tensor:
        """The K steps of one direction: ``(P, K)`` step similarities ``F_k``."""
        config, steps = self.config, []
        for _ in range(config.num_steps):
            attended, _ = cross_attention(
                query, context, query_mask=query_mask, context_mask=context_mask,
                temperature=config.attention_temperature, leaky_relu_slope=config.leaky_relu_slope,
            )
            cosine = F.cosine_similarity(query.float(), attended.float(), dim=-1, eps=_EPS)
            steps.append(masked_mean(cosine, query_mask))
            query = memory(query, attended)
        return torch.stack(steps, dim=-1)

    def score_pairs_by_step(self, image_features: LocalFeatures, text_features: LocalFeatures) -> torch.Tensor:
        """Per-step similarities ``(P, K)`` of P aligned pairs (image row p with caption row p), directions summed."""
        regions, words, word_mask = image_features.features, text_features.features, text_features.mask
        if regions.shape[0] != words.shape[0]:
            raise ValueError(f"score_pairs needs as many images as captions (aligned pairs); got {regions.shape[0]} and {words.shape[0]}.")
        if regions.shape[-1] != words.shape[-1]:
            raise ValueError(f"image and text features must have the same size D; got {regions.shape[-1]} and {words.shape[-1]}.")
        total = 0
        if self.text_memory is not None:  # Text-IMRAM: words attend over regions
            total = total + self._iterate(self.text_memory, words, word_mask, regions, image_features.mask)
        if self.image_memory is not None:  # Image-IMRAM: regions attend over words
            total = total + self._iterate(self.image_memory, regions, image_features.mask, words, word_mask)
        return total

    def score_pairs(self, image_features: LocalFeatures, text_features: LocalFeatures) -> torch.Tensor:
        """IMRAM scores ``S(I_p, T_p) = sum_k F_k`` of P aligned pairs, ``(P,)``."""
        return self.score_pairs_by_step(image_features, text_features).sum(-1)

    def score_all_pairs(
        self, image_features: LocalFeatures, text_features: LocalFeatures, by_step: bool = False
    ) -> torch.Tensor:
        """Scores of every image with every caption, ``(N_img, N_txt)`` (``(N_img, N_txt, K)`` with ``by_step``).

        Computed by pairs in chunks of about :data:`PAIR_CHUNK_SIZE` pairs.
        """
        num_images, num_texts = image_features.features.shape[0], text_features.features.shape[0]
        rows_per_chunk = max(1, PAIR_CHUNK_SIZE // max(num_texts, 1))
        blocks = []
        for rows in iter_row_chunks(num_images, rows_per_chunk):
            images = image_features.select(rows)
            n = images.features.shape[0]
            image_rows = torch.arange(n, device=images.features.device).repeat_interleave(num_texts)
            text_rows = torch.arange(num_texts, device=images.features.device).repeat(n)
            steps = self.score_pairs_by_step(images.select(image_rows), text_features.select(text_rows))
            blocks.append(steps.reshape(n, num_texts, -1))
        steps = torch.cat(blocks, dim=0)
        return steps if by_step else steps.sum(-1)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        positive_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **text_kwargs: Any,
    ) -> IMRAMOutput | tuple:
        """Score every image of the batch with every caption; with ``return_loss`` the triplet loss.

        Args:
            positive_mask: ``(N_img, N_txt)`` bool, which pairs match; ``None`` = the diagonal.
        """
        image_features = self.encode_images(pixel_values)
        text_features = self.encode_texts(input_ids, attention_mask, **text_kwargs)
        steps = self.score_all_pairs(image_features, text_features, by_step=True)
        logits = steps.sum(-1)
        loss = self.compute_loss(logits, positive_mask) if return_loss else None
        output = IMRAMOutput(
            loss=loss, logits_per_image=logits, logits_per_text=logits.t(), step_scores=steps,
            image_features=image_features, text_features=text_features,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def compute_loss(self, scores: torch.Tensor, positive_mask: torch.Tensor | None = None) -> torch.Tensor:
        """VSE++ hinge loss on ``(N_img, N_txt)`` scores, both directions: ``sum [margin + s_neg - s_pos]_+`` (hardest negative)."""
        if positive_mask is None:
            if scores.shape[0] != scores.shape[1]:
                raise ValueError(f"positive_mask is needed for a non-square batch of scores {tuple(scores.shape)}.")
            positive_mask = torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
        return bidirectional_triplet_loss(
            scores.float(), positive_mask.bool(), self.config.margin, self.config.max_violation, "sum"
        )


__all__ = [
    "IMRAMModel",
    "IMRAMOutput",
    "IMRAMPreTrainedModel",
    "LocalFeatures",
    "MemoryDistillationUnit",
    "concat_local_features",
    "cross_attention",
    "masked_mean",
]
