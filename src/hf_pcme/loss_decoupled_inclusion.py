"""Matching and uncertainty trained apart: InfoNCE on the means, ProLIP's inclusion terms on the variances.

References:
    Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP), ICML 2021.
    Chun, Kim, Park, Yun, "Probabilistic Language-Image Pre-Training" (ProLIP), ICLR 2025.
    Chun, "Improved Probabilistic Image-Text Representations" (PCME++), ICLR 2024.
    Platt, "Probabilistic Outputs for Support Vector Machines", 1999 (the calibration term).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .loss_common import (
    gaussian_kl_to_standard_normal,
    loss_output,
    match_parameters,
    require_log_sigma2,
    require_single_mean,
    resolve_positive_mask,
)
from .loss_inclusion import inclusion_terms
from .loss_infonce import InfoNCELoss
from .outputs import LossOutput, ProbabilisticEmbedding
from .scoring import CSDScore


class DecoupledInclusionLoss(nn.Module):
    r"""InfoNCE ranks the means, ProLIP's inclusion terms shape the variances, a Platt term fits ``a``, ``b``.

    ::

        L = L_infonce(mu_v, mu_t)                                                   (means; own temperature)
          + image_inclusion_weight   * mean over included (i, j) of incl(image_i in text_j)      (variances only)
          + partial_inclusion_weight * mean over rows k of incl(text_k in partial_text_k)        (variances only)
          + vib_beta * [KL(N(mu_v, sigma_v^2) || N(0, I)) + KL(text)]                (variances only)
          + calibration_weight * BCE(sigmoid(-a CSD(v_i, t_j) + b), y_ij)            (a and b; see below)

    with ``incl`` = :func:`~.loss_inclusion.inclusion_loss` and every term but InfoNCE computed on
    detached means, so the means get exactly the deterministic baseline's gradient (the towers
    still receive the variance branches' gradient, as in every probabilistic head). The
    included pairs are ``inclusion_mask`` (e.g. every image whose training caption has the same
    text: ``train.duplicate_caption_inclusion``) or else the positives; ``y_ij`` is 1 for a
    positive or an included pair. The calibration term is Platt scaling learnt on the fly: it
    fits only ``a`` and ``b`` of the match probability ``p = sigmoid(-a CSD + b)`` (PCME++'s) on
    detached embeddings, so ``p`` stays a calibrated probability without pulling on the
    representation (``calibration_trains_variances`` lets it train the variances too). A model trained with this loss should rank by the cosine of its means
    (``ranking_score: cosine`` in its config), the score InfoNCE trained.

    Departures: ProLIP trains means and variances jointly with its sigmoid CSD loss, and its
    inclusion loss lets gradients into the means; here the inclusion terms train the variances
    only (measured on shapes, docs/uncertainty.md: with gradients into the means retrieval
    collapsed), and the ranking loss is CLIP's InfoNCE on the means.

    Args:
        image_inclusion_weight: weight of ``incl(image in caption)`` over included pairs.
        partial_inclusion_weight: weight of ``incl(caption in word-dropped caption)``.
        gamma: sharpening of the inner Gaussian in the inclusion measure.
        vib_beta: weight of the KL to the standard normal (variances only).
        calibration_weight: weight of the Platt term on ``a`` and ``b`` (0: they keep their initial values).
        train_inner_variance: ``False`` detaches the inner item's variance in the inclusion terms (the
            image's in "image in caption", the full caption's in "caption in word-dropped caption"),
            so each Gaussian is fitted to the means it must include and cannot shrink its share by
            widening what it includes. Measured on shapes (docs/uncertainty.md): with it trained and
            nothing else holding the image variances, they grow and absorb the gap.
        calibration_trains_variances: the Platt term also trains the variances (PCME++'s matching
            loss on the variances, the means still fixed), as in ProLIP, whose matching loss holds
            every variance down.
        init_logit_scale, max_logit_scale: InfoNCE's temperature, as :class:`~.loss_infonce.InfoNCELoss`.
    """

    uses_match_parameters = True

    def __init__(
        self,
        image_inclusion_weight: float = 0.1,
        partial_inclusion_weight: float = 0.1,
        gamma: float = 10.0,
        vib_beta: float = 1e-4,
        calibration_weight: float = 1.0,
        train_inner_variance: bool = True,
        calibration_trains_variances: bool = False,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = 100.0,
    ):
        super().__init__()
        if gamma <= 0 or not math.isfinite(gamma):
            raise ValueError(f"gamma must be a positive finite number, got {gamma}.")
        for name, value in (("image_inclusion_weight", image_inclusion_weight),
                            ("partial_inclusion_weight", partial_inclusion_weight), ("vib_beta", vib_beta),
                            ("calibration_weight", calibration_weight)):
            if value < 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
        self.infonce = InfoNCELoss(init_logit_scale=init_logit_scale, max_logit_scale=max_logit_scale)
        self.image_inclusion_weight = image_inclusion_weight
        self.partial_inclusion_weight = partial_inclusion_weight
        self.gamma = gamma
        self.vib_beta = vib_beta
        self.calibration_weight = calibration_weight
        self.train_inner_variance = train_inner_variance
        self.calibration_trains_variances = calibration_trains_variances

    def extra_repr(self) -> str:
        return (f"image_inclusion_weight={self.image_inclusion_weight}, "
                f"partial_inclusion_weight={self.partial_inclusion_weight}, gamma={self.gamma}, "
                f"vib_beta={self.vib_beta}, calibration_weight={self.calibration_weight}, "
                f"train_inner_variance={self.train_inner_variance}, "
                f"calibration_trains_variances={self.calibration_trains_variances}")

    def reset_parameters(self) -> None:
        self.infonce.reset_parameters()

    def forward(
        self,
        image: ProbabilisticEmbedding,
        text: ProbabilisticEmbedding,
        positive_mask: torch.Tensor | None = None,
        *,
        negative_scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        partial_text: ProbabilisticEmbedding | None = None,
        partial_source: ProbabilisticEmbedding | None = None,
        inclusion_mask: torch.Tensor | None = None,
    ) -> LossOutput:
        name = "infonce_inclusion"
        image_mean = require_single_mean(image, "image", name)
        text_mean = require_single_mean(text, "text", name)
        image_log_sigma2 = require_log_sigma2(image, "image", name)
        text_log_sigma2 = require_log_sigma2(text, "text", name)
        mask = resolve_positive_mask(positive_mask, image_mean.shape[0], text_mean.shape[0], image_mean.device)
        if inclusion_mask is not None:
            inclusion_mask = resolve_positive_mask(inclusion_mask, image_mean.shape[0], text_mean.shape[0],
                                                   image_mean.device)
        terms = {"contrastive": self.infonce(image, text, mask).loss}
        terms.update(inclusion_terms(
            image, text, mask, inclusion_mask, partial_text, partial_source,
            image_inclusion_weight=self.image_inclusion_weight, partial_inclusion_weight=self.partial_inclusion_weight,
            gamma=self.gamma, detach_means=True, loss_name=name, detach_inner_variance=not self.train_inner_variance))
        if self.vib_beta:
            kl = (gaussian_kl_to_standard_normal(image_mean.detach(), image_log_sigma2).mean()
                  + gaussian_kl_to_standard_normal(text_mean.detach(), text_log_sigma2).mean())
            terms["vib"] = self.vib_beta * kl
        if self.calibration_weight:
            a, b = match_parameters(negative_scale, shift, name)
            detached = [ProbabilisticEmbedding(
                mean=mean.detach().float(),
                log_sigma2=(log_sigma2 if self.calibration_trains_variances else log_sigma2.detach()).float())
                for mean, log_sigma2 in ((image_mean, image_log_sigma2), (text_mean, text_log_sigma2))]
            logits = a * CSDScore().pairwise(*detached) + b  # CSDScore is -CSD
            targets = mask if inclusion_mask is None else mask | inclusion_mask
            terms["calibration"] = self.calibration_weight * F.binary_cross_entropy_with_logits(
                logits, targets.to(logits.dtype))
        return loss_output(terms)
