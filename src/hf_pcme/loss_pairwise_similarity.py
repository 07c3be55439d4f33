"""Pairwise similarity loss of the dual-path GCN model: separate the similarity distributions of matching and non-matching pairs.

References:
    Yu et al., "Modeling Text with Graph Convolutional Network for Cross-Modal Information Retrieval",
    PCM 2018 (arXiv:1802.00985); "Semantic Modeling of Textual Relationships in Cross-Modal Retrieval", KSEM 2019.
    Kumar B G et al., "Learning Local Image Descriptors with Deep Siamese and Triplet Convolutional
    Networks by Minimising Global Loss Functions", CVPR 2016 (the "global loss" this form comes from).
"""

from __future__ import annotations

import torch
from torch import nn

from .distances import max_pair_similarity
from .loss_common import loss_output, resolve_positive_mask
from .loss_pvse import polysemous_means
from .outputs import LossOutput, ProbabilisticEmbedding


def pairwise_similarity_terms(
    similarity: torch.Tensor, positive_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mu_pos, var_pos, mu_neg, var_neg)``: mean and (population) variance of the positive / negative similarities."""

    def moments(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if values.numel() == 0:
            zero = similarity.sum() * 0.0  # keeps the graph on a batch without negatives
            return zero, zero
        mean = values.mean()
        return mean, (values - mean).pow(2).mean()

    mu_pos, var_pos = moments(similarity[positive_mask])
    mu_neg, var_neg = moments(similarity[~positive_mask])
    return mu_pos, var_pos, mu_neg, var_neg


class PairwiseSimilarityLoss(nn.Module):
    r"""Pull relevant pairs' similarities up and irrelevant ones down, as two tight, separated distributions.

    Over the ``N_img x N_txt`` pairs of a batch, with ``s_ij = cos(v_i, t_j)`` (the best of the K x K
    pairs for items with K embeddings), ``S+`` the similarities of matching pairs and ``S-`` of the
    others::

        mu+, var+ = mean and variance of S+      mu-, var- = mean and variance of S-
        L = var_weight * (var+ + var-) + margin_weight * max(0, margin - (mu+ - mu-))

    The dual-path GCN papers describe the loss as maximising the similarity of relevant text-image
    pairs and minimising that of irrelevant pairs with this "pairwise similarity loss"; the form
    implemented (variances + a hinge on the gap between the means) is the global loss of Kumar et al.
    that the paper builds on, which is our reading of it. Variances are population variances (mean
    squared deviation). The defaults (margin 0.5, both weights 1) are ours, not published values.
    The model's ``a`` and ``b`` are not used.

    Args:
        margin: the gap ``mu+ - mu-`` below which the hinge is active.
        margin_weight: weight of the hinge term (``lambda`` in the papers).
        var_weight: weight of the two variances.
    """

    uses_match_parameters = False

    def __init__(self, margin: float = 0.5, margin_weight: float = 1.0, var_weight: float = 1.0):
        super().__init__()
        self.margin = margin
        self.margin_weight = margin_weight
        self.var_weight = var_weight

    def extra_repr(self) -> str:
        return f"margin={self.margin}, margin_weight={self.margin_weight}, var_weight={self.var_weight}"

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
        image_embeds = polysemous_means(image, "image")
        text_embeds = polysemous_means(text, "text")
        mask = resolve_positive_mask(positive_mask, image_embeds.shape[0], text_embeds.shape[0], image_embeds.device)
        similarity = max_pair_similarity(image_embeds, text_embeds)
        mu_pos, var_pos, mu_neg, var_neg = pairwise_similarity_terms(similarity, mask)
        return loss_output({
            "variance": self.var_weight * (var_pos + var_neg),
            "mean_gap": self.margin_weight * (self.margin - (mu_pos - mu_neg)).clamp_min(0.0),
        })


__all__ = ["PairwiseSimilarityLoss", "pairwise_similarity_terms"]
