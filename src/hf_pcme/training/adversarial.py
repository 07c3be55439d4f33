"""Adversarial modality classifier (GPLDAN): a discriminator on pre-fusion features, behind a gradient-reversal layer.

The classifier guesses whether a joint-space representation came from an image or a caption; its
cross-entropy trains it, while the encoders receive the *reversed* gradient (Ganin & Lempitsky,
"Unsupervised Domain Adaptation by Backpropagation", ICML 2015), so they learn features the
classifier cannot tell apart. An accuracy near 50 % means the features are modality-invariant.

    L_total = L_retrieval + BCE(classifier(GRL_lambda(f)), modality)
    GRL_lambda: identity forward, gradient * (-lambda) backward
    lambda(t) = weight                                         (schedule "constant")
    lambda(t) = weight * (2 / (1 + exp(-10 t / ramp_steps)) - 1)   (schedule "dann", Ganin & Lempitsky)

``t`` counts training forward passes (micro-batches) and is a buffer of the classifier, so it is
saved and restored with the accelerate checkpoint. The classifier belongs to the training module,
not to the model: ``save_pretrained`` never writes it and inference never needs it.

Reference: Chen, Zhang & Zhan, "Graph Pattern Loss based Diversified Attention Network for
Cross-Modal Retrieval", ICIP 2020 (arXiv:2106.13552): "a modality classifier is added to explicitly
declare the corresponding modalities of features before fusion". Training it adversarially through
a gradient reversal (as ACMR, Wang et al. MM 2017) is our reading; ``weight: 0`` keeps it as a
plain probe whose accuracy is only logged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..outputs import ProbabilisticEmbedding

SCHEDULES = ("constant", "dann")


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: torch.Tensor, coefficient: float) -> torch.Tensor:  # noqa: D102
        ctx.coefficient = coefficient
        return features.view_as(features)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # noqa: D102
        return -ctx.coefficient * grad_output, None


def reverse_gradient(features: torch.Tensor, coefficient: float = 1.0) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-coefficient`` in the backward pass."""
    return _GradientReversal.apply(features, float(coefficient))


def _representations(embedding: ProbabilisticEmbedding) -> torch.Tensor:
    mean = embedding.mean
    return mean.reshape(-1, mean.shape[-1])  # (B, D) or every one of the K representations (B K, D)


class ModalityClassifier(nn.Module):
    """Two-layer MLP ``D -> hidden -> 1`` (logit of "image") trained through a gradient-reversal layer.

    Args:
        embed_dim: size D of the joint-space features it classifies.
        hidden_dim: width of its hidden layer.
        weight: maximal gradient-reversal coefficient lambda (0: a probe that does not push the encoders).
        schedule: ``"constant"`` or ``"dann"`` (ramps lambda from 0 to ``weight``).
        ramp_steps: training forward passes over which the "dann" schedule ramps up.
    """

    def __init__(self, embed_dim: int, hidden_dim: int = 64, weight: float = 1.0, schedule: str = "dann", ramp_steps: int = 1000):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"train.modality_classifier_schedule must be one of {SCHEDULES}, got {schedule!r}.")
        if weight < 0:
            raise ValueError(f"train.modality_classifier_weight must be >= 0, got {weight}.")
        if ramp_steps < 1:
            raise ValueError(f"train.modality_classifier_ramp_steps must be >= 1, got {ramp_steps}.")
        self.weight = float(weight)
        self.schedule = schedule
        self.ramp_steps = int(ramp_steps)
        self.net = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"weight={self.weight}, schedule={self.schedule!r}, ramp_steps={self.ramp_steps}"

    def coefficient(self) -> float:
        """lambda at the current step."""
        if self.schedule == "constant":
            return self.weight
        progress = int(self.num_steps) / self.ramp_steps
        return self.weight * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)

    def forward(self, image: ProbabilisticEmbedding, text: ProbabilisticEmbedding) -> dict[str, torch.Tensor]:
        """``{"modality_classifier": BCE, "modality_accuracy": in [0, 1], "modality_reversal": lambda}``."""
        coefficient = self.coefficient()
        if self.training:
            self.num_steps += 1
        image_features, text_features = _representations(image), _representations(text)
        features = torch.cat([image_features, text_features]).float()
        targets = torch.cat([
            torch.ones(image_features.shape[0], device=features.device),
            torch.zeros(text_features.shape[0], device=features.device),
        ])
        logits = self.net(reverse_gradient(features, coefficient)).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        accuracy = ((logits > 0).float() == targets).float().mean()
        return {
            "modality_classifier": loss,
            "modality_accuracy": accuracy.detach(),
            "modality_reversal": torch.tensor(coefficient),
        }


def build_modality_classifier(recipe: Any, embed_dim: int) -> ModalityClassifier | None:
    """The classifier a recipe asks for (``train.modality_classifier``), or ``None``."""
    train = recipe.train
    if not train.modality_classifier:
        return None
    return ModalityClassifier(
        embed_dim,
        hidden_dim=train.modality_classifier_hidden_dim,
        weight=1.0 if train.modality_classifier_weight is None else train.modality_classifier_weight,
        schedule=train.modality_classifier_schedule,
        ramp_steps=train.modality_classifier_ramp_steps,
    )


__all__ = ["ModalityClassifier", "SCHEDULES", "build_modality_classifier", "reverse_gradient"]
