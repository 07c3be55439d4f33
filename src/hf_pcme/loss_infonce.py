"""Symmetric InfoNCE (N-pair / CLIP) loss on the cosine of the means, multi-positive aware.

References:
    Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective", NeurIPS 2016.
    van den Oord et al., "Representation Learning with Contrastive Predictive Coding", 2018.
    Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .loss_common import loss_output, require_single_mean, resolve_positive_mask
from .outputs import LossOutput, ProbabilisticEmbedding


def soft_target_cross_entropy(logits: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
    """Mean over rows with a positive of ``-sum_j q_ij log softmax(logits_i)_j``, ``q_i`` uniform on the positives."""
    has_positive = positive_mask.any(dim=1)
    if not bool(has_positive.any()):
        return logits.sum() * 0.0  # keeps the graph (and DDP) happy on a batch without positives
    mask = positive_mask[has_positive].to(logits.dtype)
    targets = mask / mask.sum(dim=1, keepdim=True)
    return F.cross_entropy(logits[has_positive], targets)


class InfoNCELoss(nn.Module):
    r"""Symmetric InfoNCE with a learnable temperature on the cosine similarity of the means.

    ::

        s_ij   = exp(logit_scale) * cos(mu_v_i, mu_t_j),   exp(logit_scale) clamped at max_logit_scale
        L_i2t  = mean_i  -sum_j q_ij log softmax_j(s_i.),   q_i. uniform over the positives of image i
        L_t2i  = mean_j  -sum_i q'_ij log softmax_i(s_.j),  q'_.j uniform over the positives of caption j
        L      = (L_i2t + L_t2i) / 2

    With the diagonal mask this is CLIP's loss exactly. With several positives per query the
    target is the uniform distribution over them (a soft-label cross-entropy); queries without
    any positive are left out of the mean. ``logit_scale`` is owned by this loss (CLIP init
    ``log(1 / 0.07)``; the scale is clamped at 100); it ignores the model's ``a`` and ``b``.

    Args:
        init_logit_scale: initial log inverse temperature.
        max_logit_scale: upper clamp of ``exp(logit_scale)``.

    References: Sohn, NeurIPS 2016 (N-pair); Radford et al., ICML 2021 (CLIP).
    """

    uses_match_parameters = False

    def __init__(self, init_logit_scale: float = math.log(1 / 0.07), max_logit_scale: float = 100.0):
        super().__init__()
        self.init_logit_scale = init_logit_scale
        self.max_logit_scale = max_logit_scale
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    def extra_repr(self) -> str:
        return f"max_logit_scale={self.max_logit_scale}"

    def reset_parameters(self) -> None:
        nn.init.constant_(self.logit_scale, self.init_logit_scale)

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
        image_mean = F.normalize(require_single_mean(image, "image", "infonce"), dim=-1)
        text_mean = F.normalize(require_single_mean(text, "text", "infonce"), dim=-1)
        mask = resolve_positive_mask(positive_mask, image_mean.shape[0], text_mean.shape[0], image_mean.device)
        scale = self.logit_scale.float().exp().clamp(max=self.max_logit_scale)
        logits = scale * image_mean @ text_mean.t()
        loss = 0.5 * (soft_target_cross_entropy(logits, mask) + soft_target_cross_entropy(logits.t(), mask.t()))
        return loss_output({"contrastive": loss})
