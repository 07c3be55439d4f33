"""GPLDAN's graph pattern loss: the graph of all representations of a batch, matched pairs with aligned patterns.

Reference: Chen, Zhang & Zhan, "Graph Pattern Loss based Diversified Attention Network for
Cross-Modal Retrieval", ICIP 2020 (arXiv:2106.13552).
"""

from __future__ import annotations

import torch
from torch import nn

from .distances import max_pair_similarity, pairwise_squared_l2
from .loss_common import loss_output, resolve_positive_mask
from .loss_pvse import diversity_loss, polysemous_means
from .loss_triplet import bidirectional_triplet_loss, check_reduction
from .outputs import LossOutput, ProbabilisticEmbedding

MATCH_REDUCTIONS = ("max", "mean")


def graph_patterns(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each item's pattern in the batch graph: ``(N_img, N)`` and ``(N_txt, N)``.

    The graph's ``N = (N_img + N_txt) K`` nodes are all representations of both modalities, its
    edges every squared distance ``G_ab = ||x_a - x_b||^2``. The pattern of an item with
    representations ``x^1..x^K`` is the mean of their rows, ``P_n = (1/K) sum_k G(x^k, node n)``: how
    far the item is from every node of the graph (independent of the order of its own K).
    """
    num_embeds, dim = image_embeds.shape[1], image_embeds.shape[-1]
    nodes = torch.cat([image_embeds.reshape(-1, dim), text_embeds.reshape(-1, dim)])
    distances = pairwise_squared_l2(nodes, nodes)  # (N, N)
    patterns = distances.view(-1, num_embeds, nodes.shape[0]).mean(dim=1)  # one row per item
    num_images = image_embeds.shape[0]
    return patterns[:num_images], patterns[num_images:]


def pattern_alignment(image_patterns: torch.Tensor, text_patterns: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
    """Mean over matching pairs (i, j) of ``||P(v_i) - P(t_j)||^2 / N``; 0 (with a graph) when there are none."""
    image_rows, text_rows = positive_mask.nonzero(as_tuple=True)
    if image_rows.numel() == 0:
        return image_patterns.sum() * 0.0
    difference = image_patterns[image_rows] - text_patterns[text_rows]
    return difference.pow(2).mean(dim=1).mean()


class GraphPatternLoss(nn.Module):
    r"""Graph pattern loss (GPLDAN): matching on K x K representations + aligned graph patterns + attention diversity.

    Every item has K L2-normalised representations (``mean`` ``(B, K, D)``; a ``(B, D)`` mean is K = 1)::

        s_ij      = max_{k,k'} cos(v_i^k, t_j^k')   (match_reduction="max", as the retrieval score)
                    or mean_{k,k'} cos(v_i^k, t_j^k')  ("mean": every pair of representations counts)
        L_match   = hardest-negative triplet on s, both directions, mean over matching pairs
        graph     = nodes: all (N_img + N_txt) K representations; edges: G_ab = ||x_a - x_b||^2, all pairs
        P(a)_n    = (1/K) sum_k G(a^k, n)                   (item a's pattern: its distances to every node)
        L_pattern = mean over matching (i, j) of ||P(v_i) - P(t_j)||^2 / N
        L_div     = mean_b ||Â_b Â_b^T - I||_F^2 / K^2 for images + captions (Â = L2-normalised attention rows)
        L         = L_match + pattern_weight * L_pattern + diversity_weight * L_div

    What is an interpretation: the paper describes the graph pattern loss only as a graph in which
    "all possible distances between different representations are considered"; the exact pattern
    (mean distance row per item), its alignment for matching pairs (squared difference) and the
    triplet matching term that keeps the patterns from collapsing to one point are ours. ``L_div``
    is PVSE's diversity term, applied to GPLDAN's diversified attention maps (only when K > 1). The
    model's ``a`` and ``b`` are not used.

    Args:
        margin: triplet margin.
        max_violation: hardest negative (True) or the sum over negatives (False).
        match_reduction: ``"max"`` or ``"mean"`` over the K x K representation pairs in ``L_match``.
        pattern_weight: weight of ``L_pattern``.
        diversity_weight: weight of ``L_div`` (needs ``attention``; 0 to skip).
        reduction: ``"mean"`` over matching pairs or ``"sum"`` for the triplet term.
    """

    uses_match_parameters = False

    def __init__(
        self,
        margin: float = 0.2,
        max_violation: bool = True,
        match_reduction: str = "max",
        pattern_weight: float = 1.0,
        diversity_weight: float = 0.1,
        reduction: str = "mean",
    ):
        super().__init__()
        check_reduction(reduction)
        if match_reduction not in MATCH_REDUCTIONS:
            raise ValueError(f"match_reduction must be one of {MATCH_REDUCTIONS}, got {match_reduction!r}.")
        self.margin = margin
        self.max_violation = max_violation
        self.match_reduction = match_reduction
        self.pattern_weight = pattern_weight
        self.diversity_weight = diversity_weight
        self.reduction = reduction

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, max_violation={self.max_violation}, match_reduction={self.match_reduction!r}, "
            f"pattern_weight={self.pattern_weight}, diversity_weight={self.diversity_weight}, reduction={self.reduction!r}"
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
        image_embeds = polysemous_means(image, "image")
        text_embeds = polysemous_means(text, "text")
        if image_embeds.shape[1] != text_embeds.shape[1]:
            raise ValueError(
                f"The graph_pattern loss needs the same K for both modalities, got image K = {image_embeds.shape[1]} "
                f"and text K = {text_embeds.shape[1]}."
            )
        mask = resolve_positive_mask(positive_mask, image_embeds.shape[0], text_embeds.shape[0], image_embeds.device)
        if self.match_reduction == "max":
            similarity = max_pair_similarity(image_embeds, text_embeds)
        else:
            similarity = torch.einsum("ikd,jld->ij", image_embeds, text_embeds) / image_embeds.shape[1] ** 2
        terms = {
            "triplet": bidirectional_triplet_loss(similarity, mask, self.margin, self.max_violation, self.reduction)
        }
        if self.pattern_weight:
            image_patterns, text_patterns = graph_patterns(image_embeds, text_embeds)
            terms["graph_pattern"] = self.pattern_weight * pattern_alignment(image_patterns, text_patterns, mask)
        if self.diversity_weight and image_embeds.shape[1] > 1:
            diversity = 0.0
            for embedding, modality in ((image, "image"), (text, "text")):
                if embedding.attention is None or embedding.attention.dim() != 3:
                    raise ValueError(
                        f"The graph_pattern diversity term needs {modality}.attention of shape (B, K, L); use "
                        'head_type="diversified_attention" (or "polysemous"), or pass diversity_weight=0.'
                    )
                diversity = diversity + diversity_loss(embedding.attention)
            terms["diversity"] = self.diversity_weight * diversity
        return loss_output(terms)


__all__ = ["GraphPatternLoss", "graph_patterns", "pattern_alignment"]
