"""ProLIP-style inclusion loss on top of PCME++'s CSD loss: a vaguer input's Gaussian must contain a
more specific one's.

References:
    Chun, Kim, Park, Yun, "Probabilistic Language-Image Pre-Training" (ProLIP), ICLR 2025.
    Chun, "Improved Probabilistic Image-Text Representations" (PCME++), ICLR 2024.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .loss_common import (
    at_least_float32,
    check_soft_targets,
    loss_output,
    match_parameters,
    require_log_sigma2,
    require_single_mean,
    resolve_positive_mask,
)
from .loss_csd import ClosedFormSampledDistanceLoss
from .outputs import LossOutput, ProbabilisticEmbedding


def inclusion_loss(
    mean_inner: torch.Tensor,
    log_sigma2_inner: torch.Tensor,
    mean_outer: torch.Tensor,
    log_sigma2_outer: torch.Tensor,
    gamma: float = 10.0,
) -> torch.Tensor:
    r"""How badly ``Z_inner = N(mu_1, sigma_1^2)`` fails to lie inside ``Z_outer = N(mu_2, sigma_2^2)``, per row.

    Inclusion measure (ProLIP's idea: ``Z_1 \subset Z_2`` when the region where ``Z_1`` is dense is
    also dense under ``Z_2``): the log density of ``Z_outer`` averaged over a *sharpened* ``Z_inner``,
    ``p_1^gamma`` renormalised, i.e. ``N(mu_1, sigma_1^2 / gamma)``. For diagonal Gaussians, per
    dimension, with ``s = sigma_1^2 / gamma + sigma_2^2``::

        -log E_{x ~ N(mu_1, sigma_1^2/gamma)} N(x; mu_2, sigma_2^2) = 1/2 [log(2 pi s) + (mu_1 - mu_2)^2 / s]

    The loss is this averaged over the D dimensions, without the constant ``log 2 pi``. For a
    fixed inner item it is minimised by ``sigma_2^2 = (mu_1 - mu_2)^2 - sigma_1^2 / gamma``: an outer
    Gaussian must be as wide as the spread of everything it includes, which is what ties a vague
    caption's variance to the number of images it fits (and why a training signal beyond CSD is
    needed: CSD adds ``sum sigma^2`` to every pair and so pushes variances of positives down
    whatever the caption). As ``gamma -> inf`` it is the Gaussian negative log likelihood of
    ``mu_1`` under ``Z_2``; ``gamma = 1`` is the symmetric expected-likelihood kernel.

    Departures: this closed form is derived from the measure the paper describes. ProLIP's
    released loss (naver-ai/prolip, ``src/prolip/loss.py``) is instead a sigmoid of the difference
    of two inclusion tests, ``test(1 in 2) - test(2 in 1)`` (an ordering: the outer is wider and
    contains the inner), so this is not the published loss. The mean over dimensions (not the
    sum) keeps the weight independent of D.

    Returns:
        ``(N,)`` losses of the ``N`` row pairs ``(inner_i, outer_i)``.
    """
    mean_inner, mean_outer = at_least_float32(mean_inner), at_least_float32(mean_outer)
    variance = at_least_float32(log_sigma2_inner).exp() / gamma + at_least_float32(log_sigma2_outer).exp()
    return 0.5 * (variance.log() + (mean_inner - mean_outer).pow(2) / variance).mean(dim=-1)


def inclusion_terms(
    image: ProbabilisticEmbedding,
    text: ProbabilisticEmbedding,
    positive_mask: torch.Tensor,
    inclusion_mask: torch.Tensor | None,
    partial_text: ProbabilisticEmbedding | None,
    partial_source: ProbabilisticEmbedding | None,
    *,
    image_inclusion_weight: float,
    partial_inclusion_weight: float,
    gamma: float,
    detach_means: bool,
    loss_name: str,
    detach_inner_variance: bool = False,
) -> dict[str, torch.Tensor]:
    """ProLIP's two inclusion terms, ``{"image_inclusion": ..., "partial_inclusion": ...}`` (those that apply).

    ``image_inclusion_weight * mean over included pairs (i, j) of incl(image_i in text_j)`` (pairs:
    ``inclusion_mask``, else ``positive_mask``) and ``partial_inclusion_weight * mean over rows k of
    incl(partial_source_k in partial_text_k)``, with ``incl`` = :func:`inclusion_loss`; with
    ``detach_means`` only the variances get their gradient; with ``detach_inner_variance`` only the
    outer (including) item's variance does: each Gaussian is fitted to what it must include.
    """

    def inner_log_sigma2(embedding: ProbabilisticEmbedding, name: str) -> torch.Tensor:
        log_sigma2 = require_log_sigma2(embedding, name, loss_name)
        return log_sigma2.detach() if detach_inner_variance else log_sigma2

    def mean_of(embedding: ProbabilisticEmbedding, name: str) -> torch.Tensor:
        mean = require_single_mean(embedding, name, loss_name)
        return mean.detach() if detach_means else mean

    terms = {}
    image_mean, text_mean = mean_of(image, "image"), mean_of(text, "text")
    if image_inclusion_weight:
        included = positive_mask if inclusion_mask is None else resolve_positive_mask(
            inclusion_mask, image_mean.shape[0], text_mean.shape[0], image_mean.device)
        rows, columns = included.nonzero(as_tuple=True)
        if rows.numel():
            incl = inclusion_loss(image_mean[rows], inner_log_sigma2(image, "image")[rows],
                                  text_mean[columns], require_log_sigma2(text, "text", loss_name)[columns], gamma)
            terms["image_inclusion"] = image_inclusion_weight * incl.mean()
    if partial_inclusion_weight and partial_text is not None:
        if partial_source is None:
            raise ValueError("partial_text needs partial_source: the embeddings of the full captions it was "
                             "made from, row for row.")
        inner_mean, outer_mean = mean_of(partial_source, "partial_source"), mean_of(partial_text, "partial_text")
        if inner_mean.shape != outer_mean.shape:
            raise ValueError(f"partial_text {tuple(outer_mean.shape)} and partial_source "
                             f"{tuple(inner_mean.shape)} must have the same shape (one row per caption).")
        if inner_mean.shape[0]:
            incl = inclusion_loss(inner_mean, inner_log_sigma2(partial_source, "partial_source"),
                                  outer_mean, require_log_sigma2(partial_text, "partial_text", loss_name), gamma)
            terms["partial_inclusion"] = partial_inclusion_weight * incl.mean()
    return terms


class InclusionCSDLoss(nn.Module):
    r"""PCME++'s CSD loss plus ProLIP's two inclusion terms.

    ::

        L = L_pcme++(image, text)                                       (matching + VIB + pseudo-positives)
          + image_inclusion_weight   * mean over included pairs (i, j) of incl(image_i  in text_j)
          + partial_inclusion_weight * mean over rows k of             incl(text_k   in partial_text_k)

    with ``incl`` = :func:`inclusion_loss`. ``partial_text`` are the embeddings of word-dropped
    versions of the captions ``partial_source`` (the full captions they were made from, row for
    row): a caption with words removed says less, so its Gaussian must contain the full caption's
    (ProLIP: "masked inputs include the original"). ``image in text``: a caption describes a set
    of images, so its Gaussian must contain its images'. The included pairs are the positive pairs,
    or ``inclusion_mask`` when given (e.g. every image whose training caption has the same text:
    ``train.duplicate_caption_inclusion``). Both directions as in ProLIP; the
    training module makes the partial captions (``train.partial_caption_ratio``,
    ``train.word_drop_prob``).

    Departures from ProLIP: ProLIP's matching loss is a SigLIP-like sigmoid loss on CSD, here it is
    PCME++'s (with its VIB and pseudo-positives); ProLIP also masks image patches (a CNN tower has
    none here: only captions are word-dropped); see :func:`inclusion_loss` for the measure. With
    ``detach_means`` (our default) the inclusion terms train only the variances: the means get
    their gradient from the matching loss alone. Measured on shapes (docs/uncertainty.md): with
    gradients into the means, the ``1 / s`` weight of the inclusion term (``s`` ~ sigma^2, small)
    overwhelms the matching loss and retrieval collapses.

    Args:
        vib_beta, pseudo_positive_weight: as :class:`~.loss_csd.ClosedFormSampledDistanceLoss`.
        image_inclusion_weight: weight of ``incl(image in caption)`` over positive pairs.
        partial_inclusion_weight: weight of ``incl(caption in word-dropped caption)``.
        gamma: sharpening of the inner Gaussian in the inclusion measure.
        detach_means: stop the inclusion terms' gradient into the means (only variances learn from them).

    Reference: Chun et al., "Probabilistic Language-Image Pre-Training", ICLR 2025.
    """

    uses_match_parameters = True

    def __init__(
        self,
        vib_beta: float = 1e-4,
        pseudo_positive_weight: float = 0.1,
        image_inclusion_weight: float = 0.1,
        partial_inclusion_weight: float = 0.1,
        gamma: float = 10.0,
        detach_means: bool = True,
    ):
        super().__init__()
        if gamma <= 0 or not math.isfinite(gamma):
            raise ValueError(f"gamma must be a positive finite number, got {gamma}.")
        self.csd = ClosedFormSampledDistanceLoss(vib_beta=vib_beta, pseudo_positive_weight=pseudo_positive_weight)
        self.image_inclusion_weight = image_inclusion_weight
        self.partial_inclusion_weight = partial_inclusion_weight
        self.gamma = gamma
        self.detach_means = detach_means

    def extra_repr(self) -> str:
        return (f"image_inclusion_weight={self.image_inclusion_weight}, "
                f"partial_inclusion_weight={self.partial_inclusion_weight}, gamma={self.gamma}, "
                f"detach_means={self.detach_means}")

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
        partial_text: ProbabilisticEmbedding | None = None,
        partial_source: ProbabilisticEmbedding | None = None,
        inclusion_mask: torch.Tensor | None = None,
    ) -> LossOutput:
        image_mean = require_single_mean(image, "image", "prolip")
        text_mean = require_single_mean(text, "text", "prolip")
        image_log_sigma2 = require_log_sigma2(image, "image", "prolip")
        text_log_sigma2 = require_log_sigma2(text, "text", "prolip")
        mask = resolve_positive_mask(positive_mask, image_mean.shape[0], text_mean.shape[0], image_mean.device)
        a, b = match_parameters(negative_scale, shift, "prolip")
        targets = mask if soft_targets is None else check_soft_targets(soft_targets, mask)
        terms = self.csd.csd_terms(image, text, targets, mask, a, b)
        terms.update(inclusion_terms(
            image, text, mask, inclusion_mask, partial_text, partial_source, image_inclusion_weight=self.image_inclusion_weight,
            partial_inclusion_weight=self.partial_inclusion_weight, gamma=self.gamma, detach_means=self.detach_means,
            loss_name="prolip"))
        return loss_output(terms)
