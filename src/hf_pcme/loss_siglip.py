"""SigLIP: a sigmoid loss on every image-caption pair of the batch, multi-positive aware.

Reference: Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .loss_common import loss_output, require_single_mean, resolve_positive_mask
from .outputs import LossOutput, ProbabilisticEmbedding


class SigmoidPairLoss(nn.Module):
    r"""SigLIP's pairwise sigmoid loss on the cosine of the means.

    ::

        z_ij = +1 if (v_i, t_j) match else -1
        L    = -(1 / N_img) sum_{i, j} log sigmoid(z_ij (exp(logit_scale) cos(mu_v_i, mu_t_j) + logit_bias))

    Each pair is an independent binary decision, so several positives per query need no
    special case. ``logit_scale`` and ``logit_bias`` are owned by this loss (SigLIP's init:
    ``log 10`` and ``-10``); the model's ``a`` and ``b`` are not used.

    Args:
        init_logit_scale: initial log temperature ``t'`` (``exp(t')`` multiplies the cosine).
        init_logit_bias: initial bias ``b``.
    """

    uses_match_parameters = False

    def __init__(self, init_logit_scale: float = math.log(10.0), init_logit_bias: float = -10.0):
        super().__init__()
        self.init_logit_scale = init_logit_scale
        self.init_logit_bias = init_logit_bias
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.logit_scale, self.init_logit_scale)
        nn.init.constant_(self.logit_bias, self.init_logit_bias)

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
        image_mean = F.normalize(require_single_mean(image, "image", "siglip"), dim=-1)
        text_mean = F.normalize(require_single_mean(text, "text", "siglip"), dim=-1)
        mask = resolve_positive_mask(positive_mask, image_mean.shape[0], text_mean.shape[0], image_mean.device)
        logits = self.logit_scale.float().exp() * image_mean @ text_mean.t() + self.logit_bias.float()
        signs = mask.to(logits.dtype) * 2.0 - 1.0
        loss = -F.logsigmoid(signs * logits).sum() / image_mean.shape[0]
        return loss_output({"sigmoid": loss})
