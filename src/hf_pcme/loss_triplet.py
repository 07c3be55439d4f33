"""VSE++ hinge triplet loss with the hardest negative, both directions, multi-positive aware.

Reference: Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives", BMVC 2018.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distances import iter_row_chunks
from .loss_common import loss_output, require_single_mean, resolve_positive_mask
from .outputs import LossOutput, ProbabilisticEmbedding

#: Elements of the (rows, positives, negatives) block of the sum-over-negatives variant.
_SUM_VARIANT_BLOCK_ELEMENTS = 1 << 22

REDUCTIONS = ("sum", "mean")


def triplet_costs(
    similarity: torch.Tensor, positive_mask: torch.Tensor, margin: float, max_violation: bool
) -> torch.Tensor:
    """Hinge cost of every positive pair for the queries along dim 0, shape ``(N, M)`` (0 off the mask).

    For query ``i`` and positive ``p``, with ``Neg(i)`` the items not positive for ``i``:
        hardest (``max_violation=True``):  ``max_{j in Neg(i)} [margin + s_ij - s_ip]_+``
        sum     (``max_violation=False``): ``sum_{j in Neg(i)} [margin + s_ij - s_ip]_+``
    A query without negatives costs 0.
    """
    negative_scores = similarity.masked_fill(positive_mask, -torch.inf)
    if max_violation:
        hardest = negative_scores.amax(dim=1, keepdim=True)
        costs = (margin + hardest - similarity).clamp_min(0.0)
    else:
        num_items = similarity.shape[1]
        rows_per_block = max(1, _SUM_VARIANT_BLOCK_ELEMENTS // max(1, num_items * num_items))
        blocks = []
        for rows in iter_row_chunks(similarity.shape[0], rows_per_block):
            # (rows, positive p, negative j): margin + s_ij - s_ip
            violation = margin + negative_scores[rows].unsqueeze(1) - similarity[rows].unsqueeze(2)
            blocks.append(violation.clamp_min(0.0).sum(dim=2))
        costs = torch.cat(blocks)
    return costs.masked_fill(~positive_mask, 0.0)


def bidirectional_triplet_loss(
    similarity: torch.Tensor, positive_mask: torch.Tensor, margin: float, max_violation: bool, reduction: str
) -> torch.Tensor:
    """``R(i2t costs) + R(t2i costs)``, ``R`` = sum, or mean over the positive pairs."""
    i2t = triplet_costs(similarity, positive_mask, margin, max_violation)
    t2i = triplet_costs(similarity.t(), positive_mask.t(), margin, max_violation)
    total = i2t.sum() + t2i.sum()
    if reduction == "mean":
        total = total / positive_mask.sum().clamp_min(1)
    return total


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


class HardestNegativeTripletLoss(nn.Module):
    r"""VSE++: hinge triplet loss on the cosine of the means against the hardest negative.

    ::

        s_ij  = cos(mu_v_i, mu_t_j)
        L_i2t = sum over positive pairs (i, p) of max_{j not positive for i}  [margin + s_ij - s_ip]_+
        L_t2i = sum over positive pairs (i, p) of max_{k not positive for p}  [margin + s_kp - s_ip]_+
        L     = L_i2t + L_t2i

    ``max_violation=False`` replaces the max by a sum over the negatives (VSE0). Negatives
    exclude *all* positives of the query, so with a multi-positive mask another caption of the
    same image is never a negative. The reduction is a sum as in VSE++ (``reduction="mean"``
    divides by the number of positive pairs). The model's ``a`` and ``b`` are not used.

    Args:
        margin: hinge margin (VSE++: 0.2).
        max_violation: hardest negative (True, VSE++) or the sum over negatives (False).
        reduction: ``"sum"`` (VSE++) or ``"mean"`` over positive pairs.

    Reference: Faghri et al., "VSE++: Improving Visual-Semantic Embeddings with Hard Negatives", BMVC 2018.
    """

    uses_match_parameters = False

    def __init__(self, margin: float = 0.2, max_violation: bool = True, reduction: str = "sum"):
        super().__init__()
        check_reduction(reduction)
        self.margin = margin
        self.max_violation = max_violation
        self.reduction = reduction

    def extra_repr(self) -> str:
        return f"margin={self.margin}, max_violation={self.max_violation}, reduction={self.reduction!r}"

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
        image_mean = F.normalize(require_single_mean(image, "image", "vsepp"), dim=-1)
        text_mean = F.normalize(require_single_mean(text, "text", "vsepp"), dim=-1)
        mask = resolve_positive_mask(positive_mask, image_mean.shape[0], text_mean.shape[0], image_mean.device)
        similarity = image_mean @ text_mean.t()
        loss = bidirectional_triplet_loss(similarity, mask, self.margin, self.max_violation, self.reduction)
        return loss_output({"triplet": loss})
