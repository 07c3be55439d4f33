"""PCME++'s closed-form sampled distance (CSD) loss with VIB and pseudo-positives.

Reference: Chun, "Improved Probabilistic Image-Text Representations", ICLR 2024.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distances import pairwise_csd
from .loss_common import (
    check_soft_targets,
    gaussian_kl_to_standard_normal,
    loss_output,
    match_parameters,
    require_log_sigma2,
    require_single_mean,
    resolve_positive_mask,
)
from .outputs import LossOutput, ProbabilisticEmbedding


def pseudo_positive_targets(logits: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
    """Targets of PCME++'s pseudo-positive term for queries along dim 0: ``(N, M)`` float.

    A pair ``(i, j)`` becomes positive when its logit is at least the query's ground-truth logit.
    With several positives per query the ground truth is the *lowest-scoring* positive (a pair
    that outranks any true match counts); with one positive (the original's diagonal) this is
    exactly the original rule. Queries without positives keep their targets.
    """
    logits = logits.detach()
    ground_truth = logits.masked_fill(~positive_mask, torch.inf).amin(dim=1, keepdim=True)
    return (positive_mask | (logits >= ground_truth)).to(logits.dtype)


class ClosedFormSampledDistanceLoss(nn.Module):
    r"""PCME++ loss: binary cross-entropy on ``-a CSD + b``, + VIB, + pseudo-positives.

    With Gaussians ``N(mu, diag(sigma^2))`` and the model's learnable ``a`` (negative_scale)
    and ``b`` (shift)::

        CSD(v, t) = ||mu_v - mu_t||^2 + sum_d sigma_v^2 + sum_d sigma_t^2
        logit_ij  = -a CSD(v_i, t_j) + b                     (no factor 2, unlike PCME)
        BCE(T)    = mean over the N x M pairs of BCEWithLogits(logit_ij, T_ij)
        L = 2 BCE(positive_mask)                              (i2t + t2i, identical)
          + vib_beta * (KL_mean(image) + KL_mean(text))
          + alpha * (BCE(T_i2t) + BCE(T_t2i))

    ``KL_mean`` is ``-0.5 (1 + log_sigma2 - mu^2 - exp(log_sigma2))`` averaged over batch and
    dimensions (mean-reduced, as in the original; beta 1e-4). ``T_i2t`` adds to the positives every
    pair whose logit is at least its image query's ground-truth logit, ``T_t2i`` the same per caption
    query (see :func:`pseudo_positive_targets`); alpha = ``pseudo_positive_weight`` = 0.1.
    ``soft_targets`` (float ``(N, M)`` in [0, 1], e.g. from PCME++'s mixed-sample augmentation)
    replace the 0/1 ``positive_mask`` in the matching term; the pseudo-positives still start from
    ``positive_mask``.
    Pseudo-positive targets are chosen without gradient. The original's guard that drops a VIB
    term above 10,000 is not reproduced.

    With ``point_embeddings=True`` an embedding without ``log_sigma2`` (a deterministic head) is
    a zero-variance Gaussian: ``CSD = ||mu_v - mu_t||^2`` and no VIB term. This is the ablation
    "PCME++'s loss without uncertainty"; by default such embeddings are refused.

    Args:
        vib_beta: weight of the VIB KL term (PCME++ COCO: 1e-4).
        pseudo_positive_weight: alpha of the pseudo-positive term (PCME++: 0.1; 0 disables it).
        point_embeddings: accept embeddings without variances (zero variance, no VIB).

    Reference: Chun, "Improved Probabilistic Image-Text Representations", ICLR 2024.
    """

    uses_match_parameters = True

    def __init__(self, vib_beta: float = 1e-4, pseudo_positive_weight: float = 0.1, point_embeddings: bool = False):
        super().__init__()
        self.vib_beta = vib_beta
        self.pseudo_positive_weight = pseudo_positive_weight
        self.point_embeddings = point_embeddings

    def extra_repr(self) -> str:
        return (f"vib_beta={self.vib_beta}, pseudo_positive_weight={self.pseudo_positive_weight}, "
                f"point_embeddings={self.point_embeddings}")

    def _log_sigma2(self, embedding: ProbabilisticEmbedding, modality: str) -> torch.Tensor | None:
        if self.point_embeddings and embedding.log_sigma2 is None:
            return None
        return require_log_sigma2(embedding, modality, "pcme++")

    def matching_logits(
        self, image: ProbabilisticEmbedding, text: ProbabilisticEmbedding, a: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        """``-a CSD(v_i, t_j) + b`` for every pair, ``(N_img, N_txt)``."""
        image_mean = require_single_mean(image, "image", "pcme++")
        text_mean = require_single_mean(text, "text", "pcme++")
        image_log_sigma2 = self._log_sigma2(image, "image")
        text_log_sigma2 = self._log_sigma2(text, "text")
        # A point is a Gaussian with zero variance: log sigma^2 = -inf adds nothing to the CSD.
        if image_log_sigma2 is None:
            image_log_sigma2 = torch.full_like(image_mean, -torch.inf)
        if text_log_sigma2 is None:
            text_log_sigma2 = torch.full_like(text_mean, -torch.inf)
        return -a * pairwise_csd(image_mean, image_log_sigma2, text_mean, text_log_sigma2) + b

    def csd_terms(
        self,
        image: ProbabilisticEmbedding,
        text: ProbabilisticEmbedding,
        targets: torch.Tensor,
        positive_mask: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The matching, VIB and pseudo-positive terms against ``targets`` (bool or soft float, ``(N, M)``)."""
        logits = self.matching_logits(image, text, a, b)
        terms = {"matching": 2.0 * F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))}
        if self.vib_beta:
            kl = 0.0
            for embedding in (image, text):
                if embedding.log_sigma2 is not None:
                    kl = kl + gaussian_kl_to_standard_normal(embedding.mean, embedding.log_sigma2).mean()
            if torch.is_tensor(kl):
                terms["vib"] = self.vib_beta * kl
        if self.pseudo_positive_weight:
            targets_i2t = pseudo_positive_targets(logits, positive_mask)
            targets_t2i = pseudo_positive_targets(logits.t(), positive_mask.t()).t()
            pseudo = F.binary_cross_entropy_with_logits(logits, targets_i2t)
            pseudo = pseudo + F.binary_cross_entropy_with_logits(logits, targets_t2i)
            terms["pseudo_positive"] = self.pseudo_positive_weight * pseudo
        return terms

    def forward(
        self,
        image: ProbabilisticEmbedding,
        text: ProbabilisticEmbedding,
        positive_mask: torch.Tensor | None = None,
        *,
        negative_scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        soft_targets: torch.Tensor | None = None,
    ) -> LossOutput:
        image_mean = require_single_mean(image, "image", "pcme++")
        text_mean = require_single_mean(text, "text", "pcme++")
        mask = resolve_positive_mask(positive_mask, image_mean.shape[0], text_mean.shape[0], image_mean.device)
        a, b = match_parameters(negative_scale, shift, "pcme++")
        targets = mask if soft_targets is None else check_soft_targets(soft_targets, mask)
        return loss_output(self.csd_terms(image, text, targets, mask, a, b))
