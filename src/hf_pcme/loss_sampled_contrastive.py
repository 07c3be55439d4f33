"""PCME's Monte-Carlo soft contrastive loss with the VIB regulariser (and CUB's uniformity term).

Reference: Chun et al., "Probabilistic Embeddings for Cross-Modal Retrieval", CVPR 2021.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .distances import iter_row_chunks, pairwise_sampled_match_log_prob, pairwise_squared_l2
from .loss_common import (
    at_least_float32,
    gaussian_kl_to_standard_normal,
    loss_output,
    match_parameters,
    require_log_sigma2,
    require_samples,
    resolve_positive_mask,
)
from .outputs import LossOutput, ProbabilisticEmbedding

#: Rows of the uniformity term's pairwise matrix computed (and recomputed in backward) at once.
UNIFORMITY_CHUNK_ROWS = 1024


def _upper_triangle_row_logsumexp(points: torch.Tensor, start: int, stop: int, temperature: float) -> torch.Tensor:
    """``log sum_{j > i} exp(-t ||x_i - x_j||^2)`` for rows ``i`` in ``[start, stop)``."""
    squared = pairwise_squared_l2(points[start:stop], points)
    rows = torch.arange(start, stop, device=points.device).unsqueeze(1)
    columns = torch.arange(points.shape[0], device=points.device).unsqueeze(0)
    scores = torch.where(columns > rows, -temperature * squared, squared.new_tensor(-math.inf))
    return torch.logsumexp(scores, dim=1)


def uniformity_loss(points: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Uniformity ``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` over all pairs of the ``(P, D)`` points.

    Wang & Isola, "Understanding Contrastive Representation Learning through Alignment and
    Uniformity on the Hypersphere", ICML 2020; PCME adds it on CUB (t = 2). Computed exactly over
    every pair (the original subsamples 128 points when there are more) as a logsumexp, in row
    blocks that are recomputed in backward, so memory stays O(P x block).
    """
    num_points = points.shape[0]
    if num_points < 2:
        raise ValueError(f"points must hold at least 2 points for the uniformity loss, got {tuple(points.shape)}.")
    points = at_least_float32(points)
    row_lses = []
    # The last row has no j > i: leave it out (its logsumexp would be -inf, its gradient NaN).
    for rows in iter_row_chunks(num_points - 1, UNIFORMITY_CHUNK_ROWS):
        if torch.is_grad_enabled() and points.requires_grad:
            row_lse = checkpoint(
                _upper_triangle_row_logsumexp, points, rows.start, rows.stop, temperature, use_reentrant=False
            )
        else:
            row_lse = _upper_triangle_row_logsumexp(points, rows.start, rows.stop, temperature)
        row_lses.append(row_lse)
    num_pairs = num_points * (num_points - 1) / 2
    return torch.logsumexp(torch.cat(row_lses), dim=0) - math.log(num_pairs)


class SampledContrastiveLoss(nn.Module):
    r"""PCME loss: negative log of the Monte-Carlo match probability of every pair, + VIB (+ uniformity).

    With samples ``z_v^j`` of image v and ``z_t^j'`` of caption t (J each) and the model's
    learnable ``a`` (negative_scale) and ``b`` (shift)::

        p(m=1 | v, t) = 1/J^2 sum_{j,j'} sigmoid(2 (-a ||z_v^j - z_t^j'|| + b))     (distance eps 1e-6)
        L_match = 2 * sum_{i,j} -log p(m = m_ij | v_i, t_j),   m_ij = positive_mask[i, j]

    Both logs are computed stably as a logsumexp over the J^2 sample pairs. The factor 2 is the
    original's i2t + t2i sum: the two directions visit the same pairs with the same probabilities
    (multi-positive masks included), so they are equal and computed once.

    **Reduction: sum over all N x M pairs**, as the original (``MCSoftContrastiveLoss`` uses
    ``reduction='sum'`` for both the positive and negative parts), so the published ``vib_beta``
    keeps its meaning against the matching term. The loss therefore grows with the batch size
    squared; the learning rate of the original recipe (batch 128) goes with it.

    VIB regulariser (weight ``vib_beta``, 1e-5 on COCO, 1e-3 on CUB)::

        L_vib = sum over batch and dims of KL(N(mu, sigma^2) || N(0, I))
              = sum -0.5 (1 + log_sigma2 - mu^2 - exp(log_sigma2)),   images + captions

    summed over batch and dimensions as in the original. Differences from the original code:
    ``mu`` is the head's mean (the original plugs in the average of the J samples, a noisy
    estimate of it), and ``log_sigma2`` is the log variance the samples were drawn with (the
    original's ``logsigma`` is a log standard deviation for the sampler but a log variance for
    this KL; converted checkpoints use ``log_sigma2 = 2 logsigma``).

    Uniformity (weight ``uniformity_weight``, 0 by default, 10 on CUB): :func:`uniformity_loss`
    over all samples of both modalities.

    In the original only the diagonal is positive (two captions of one image in a batch are
    negatives of each other's image); pass ``positive_mask`` to mark every matching pair.

    Args:
        vib_beta: weight of the VIB KL term.
        uniformity_weight: weight of the uniformity term.
        uniformity_temperature: ``t`` of the uniformity term.
        chunk_size: image items per block of the sampled match probability (``None``: automatic).

    Reference: Chun et al., "Probabilistic Embeddings for Cross-Modal Retrieval", CVPR 2021.
    """

    uses_match_parameters = True

    def __init__(
        self,
        vib_beta: float = 1e-5,
        uniformity_weight: float = 0.0,
        uniformity_temperature: float = 2.0,
        chunk_size: int | None = None,
    ):
        super().__init__()
        self.vib_beta = vib_beta
        self.uniformity_weight = uniformity_weight
        self.uniformity_temperature = uniformity_temperature
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        return (
            f"vib_beta={self.vib_beta}, uniformity_weight={self.uniformity_weight}, "
            f"uniformity_temperature={self.uniformity_temperature}"
        )

    def forward(
        self,
        image: ProbabilisticEmbedding,
        text: ProbabilisticEmbedding,
        positive_mask: torch.Tensor | None = None,
        *,
        negative_scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> LossOutput:
        image_samples = require_samples(image, "image", "pcme")
        text_samples = require_samples(text, "text", "pcme")
        mask = resolve_positive_mask(positive_mask, image_samples.shape[0], text_samples.shape[0], image_samples.device)
        a, b = match_parameters(negative_scale, shift, "pcme")

        log_p, log_not_p = pairwise_sampled_match_log_prob(
            image_samples, text_samples, a, b, chunk_size=self.chunk_size
        )
        terms = {"matching": -2.0 * torch.where(mask, log_p, log_not_p).sum()}
        if self.vib_beta:
            kl = sum(
                gaussian_kl_to_standard_normal(embedding.mean, require_log_sigma2(embedding, modality, "pcme")).sum()
                for embedding, modality in ((image, "image"), (text, "text"))
            )
            terms["vib"] = self.vib_beta * kl
        if self.uniformity_weight:
            dim = image_samples.shape[-1]
            points = torch.cat([image_samples.reshape(-1, dim), text_samples.reshape(-1, dim)])
            terms["uniformity"] = self.uniformity_weight * uniformity_loss(points, self.uniformity_temperature)
        return loss_output(terms)
