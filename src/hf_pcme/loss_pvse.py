"""PVSE: multiple-instance triplet loss on K embeddings per item, + diversity, + MMD.

Reference: Song & Soleymani, "Polysemous Visual-Semantic Embedding for Cross-Modal Retrieval", CVPR 2019.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distances import max_pair_similarity, pairwise_squared_l2
from .loss_common import at_least_float32, loss_output, resolve_positive_mask
from .loss_triplet import bidirectional_triplet_loss, check_reduction
from .outputs import LossOutput, ProbabilisticEmbedding


def polysemous_means(embedding: ProbabilisticEmbedding, modality: str) -> torch.Tensor:
    """``(B, K, D)`` float32 L2-normalised embeddings (a ``(B, D)`` mean is K = 1)."""
    mean = embedding.mean
    if mean is None or mean.dim() not in (2, 3):
        shape = None if mean is None else tuple(mean.shape)
        raise ValueError(f"{modality}.mean must be (B, K, D) or (B, D) for the pvse loss, got shape {shape}.")
    mean = at_least_float32(mean)
    if mean.dim() == 2:
        mean = mean.unsqueeze(1)
    return F.normalize(mean, dim=-1)


def diversity_loss(attention: torch.Tensor) -> torch.Tensor:
    """``mean_b ||A_b A_b^T - I||_F^2 / K^2`` with the K attention maps of ``A_b (K, L)`` L2-normalised."""
    attention = F.normalize(at_least_float32(attention), dim=-1)
    num_embeds = attention.shape[1]
    gram = attention @ attention.transpose(1, 2)
    identity = torch.eye(num_embeds, device=gram.device, dtype=gram.dtype)
    return (gram - identity).pow(2).sum(dim=(1, 2)).mean() / num_embeds**2


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """Biased MMD^2 ``mean k(x, x') + mean k(y, y') - 2 mean k(x, y)``, ``k = exp(-gamma ||x - y||^2)``."""
    kernel_mean = lambda u, v: torch.exp(-gamma * pairwise_squared_l2(u, v)).mean()  # noqa: E731
    return kernel_mean(x, x) + kernel_mean(y, y) - 2.0 * kernel_mean(x, y)


class PolysemousTripletLoss(nn.Module):
    r"""PVSE loss: MIL hardest-negative triplet on the best of K x K embedding pairs, + diversity, + MMD.

    Each item has K L2-normalised embeddings (``mean`` of shape ``(B, K, D)``) and K attention
    maps over its L local features (``attention`` of shape ``(B, K, L)``)::

        s_ij   = max_{k, k'} cos(e_v_i^k, e_t_j^k')                    (multiple-instance similarity)
        L_rank = triplet on s (see HardestNegativeTripletLoss), mean over positive pairs
        L_div  = mean_b ||Â_b Â_b^T - I||_F^2 / K^2 for images + captions, Â = rows of A L2-normalised
        L_mmd  = MMD^2(all image embeddings, all caption embeddings), Gaussian kernel exp(-gamma ||x - y||^2)
        L      = L_rank + diversity_weight * L_div + mmd_weight * L_mmd

    As in the original, the two regularisers only apply when K > 1, and the ranking loss is
    averaged (over queries = positive pairs for the diagonal). Deliberate differences from the
    original code (which wrote ``||A A^T - I||`` unsquared and used the kernel
    ``exp(-gamma ||x - y||)`` with gamma 0.5): the diversity term is the squared Frobenius norm of
    the paper, and the MMD uses a true Gaussian kernel (gamma 0.5 = unit bandwidth). Defaults are
    the COCO recipe of the PVSE repository (margin 0.1, max violation, div 0.1, mmd 0.01).

    Args:
        margin: hinge margin.
        max_violation: hardest negative (True) or the sum over negatives (False).
        diversity_weight: weight of the diversity term (needs ``attention``).
        mmd_weight: weight of the MMD term.
        mmd_gamma: ``gamma`` of the Gaussian kernel.
        reduction: ``"mean"`` over positive pairs (PVSE) or ``"sum"``.

    Reference: Song & Soleymani, "Polysemous Visual-Semantic Embedding for Cross-Modal Retrieval", CVPR 2019.
    """

    uses_match_parameters = False

    def __init__(
        self,
        margin: float = 0.1,
        max_violation: bool = True,
        diversity_weight: float = 0.1,
        mmd_weight: float = 0.01,
        mmd_gamma: float = 0.5,
        reduction: str = "mean",
    ):
        super().__init__()
        check_reduction(reduction)
        self.margin = margin
        self.max_violation = max_violation
        self.diversity_weight = diversity_weight
        self.mmd_weight = mmd_weight
        self.mmd_gamma = mmd_gamma
        self.reduction = reduction

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, max_violation={self.max_violation}, diversity_weight={self.diversity_weight}, "
            f"mmd_weight={self.mmd_weight}, mmd_gamma={self.mmd_gamma}, reduction={self.reduction!r}"
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
        mask = resolve_positive_mask(positive_mask, image_embeds.shape[0], text_embeds.shape[0], image_embeds.device)
        similarity = max_pair_similarity(image_embeds, text_embeds)
        terms = {
            "triplet": bidirectional_triplet_loss(similarity, mask, self.margin, self.max_violation, self.reduction)
        }
        polysemous = image_embeds.shape[1] > 1 or text_embeds.shape[1] > 1
        if polysemous and self.diversity_weight:
            diversity = 0.0
            for embedding, modality in ((image, "image"), (text, "text")):
                if embedding.attention is None or embedding.attention.dim() != 3:
                    raise ValueError(
                        f"The pvse diversity term needs {modality}.attention of shape (B, K, L), got "
                        f"{None if embedding.attention is None else tuple(embedding.attention.shape)}; use "
                        'head_type="polysemous" or pass diversity_weight=0.'
                    )
                diversity = diversity + diversity_loss(embedding.attention)
            terms["diversity"] = self.diversity_weight * diversity
        if polysemous and self.mmd_weight:
            dim = image_embeds.shape[-1]
            mmd = gaussian_mmd(image_embeds.reshape(-1, dim), text_embeds.reshape(-1, dim), self.mmd_gamma)
            terms["mmd"] = self.mmd_weight * mmd
        return loss_output(terms)
