"""Output dataclasses shared by heads, losses and the model.

Every embedding is a diagonal Gaussian ``N(mean, diag(exp(log_sigma2)))`` in the joint space
(PCME, Chun et al. CVPR 2021). Deterministic heads leave ``log_sigma2`` and ``samples`` as
``None``; polysemous heads (PVSE, Song & Soleymani CVPR 2019) give ``mean`` of shape (B, K, D).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput


@dataclass
class ProbabilisticEmbedding(ModelOutput):
    """Embeddings of one modality for a batch.

    Args:
        mean: ``(B, D)`` L2-normalised means, or ``(B, K, D)`` for a polysemous head.
        log_sigma2: ``(B, D)`` log variances (natural log of sigma^2), or ``None`` for
            deterministic / polysemous heads.
        samples: ``(B, J, D)`` Monte-Carlo samples ``mean + exp(0.5 * log_sigma2) * eps``,
            or ``None`` when no sampling was done.
        attention: ``(B, K, L)`` attention weights of the pooling head over the L local
            features (K attention heads; padding positions have weight 0), or ``None``.
    """

    mean: torch.FloatTensor | None = None
    log_sigma2: torch.FloatTensor | None = None
    samples: torch.FloatTensor | None = None
    attention: torch.FloatTensor | None = None

    def select(self, rows: slice | torch.Tensor) -> "ProbabilisticEmbedding":
        """The embeddings of ``rows`` (a slice or an index tensor) of the batch, every field alike."""
        return ProbabilisticEmbedding(**{key: value[rows] for key, value in self.items()})

    @property
    def uncertainty(self) -> torch.FloatTensor | None:
        """Per-item uncertainty: the mean of sigma^2 over the D dimensions, shape ``(B,)``.

        ``None`` for heads without a variance.
        """
        if self.log_sigma2 is None:
            return None
        return self.log_sigma2.float().exp().mean(dim=-1)


@dataclass
class LossOutput(ModelOutput):
    """A loss value and its named components (each already weighted, detached or not)."""

    loss: torch.FloatTensor | None = None
    components: dict[str, torch.Tensor] | None = None


@dataclass
class PCMEOutput(ModelOutput):
    """Output of :meth:`PCMEModel.forward`.

    Args:
        loss: training loss (when ``return_loss=True``).
        loss_components: the named terms of the loss (e.g. ``{"matching": ..., "vib": ...}``).
        logits_per_image: ``(N_img, N_txt)`` ranking scores, higher = better match (see
            :meth:`PCMEModel.pairwise_logits`).
        logits_per_text: its transpose.
        match_prob: ``(N_img, N_txt)`` match probabilities (see :meth:`PCMEModel.match_probability`).
        image_embeds / text_embeds: :class:`ProbabilisticEmbedding` of each modality (``mean``,
            ``log_sigma2``, ``samples``, ``attention``, ``uncertainty``).
    """

    loss: torch.FloatTensor | None = None
    loss_components: dict[str, torch.Tensor] | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    match_prob: torch.FloatTensor | None = None
    image_embeds: ProbabilisticEmbedding | None = None
    text_embeds: ProbabilisticEmbedding | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())
