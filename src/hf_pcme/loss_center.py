"""Cross-modal centre loss: one learnable centre per class, shared by images and captions.

References:
    Jing et al., "Cross-Modal Center Loss for 3D Cross-Modal Retrieval", CVPR 2021.
    Wen et al., "A Discriminative Feature Learning Approach for Deep Face Recognition", ECCV 2016.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .loss_common import at_least_float32, loss_output, require_single_mean, resolve_positive_mask
from .outputs import LossOutput, ProbabilisticEmbedding


class CrossModalCenterLoss(nn.Module):
    r"""Pull every image and caption mean towards the learnable centre of its class.

    ::

        L = 1/N_img sum_i ||mu_v_i - c_{y_i}||^2  +  1/N_txt sum_j ||mu_t_j - c_{y_j}||^2

    i.e. the centre loss of Wen et al. applied to both modalities with *shared* centres
    ``c (num_classes, embed_dim)`` (Jing et al.; their code also drops the 1/2 of Wen et al.).
    Centres start as ``N(0, 1/embed_dim)`` so that their norm is about 1 like the L2-normalised
    means (the original draws ``N(0, 1)``). On its own the loss only clusters each class; it is
    meant to be combined with a discriminative loss (Jing et al. add a shared classifier).

    ``labels``: ``(N,)`` class ids shared by image i and caption i when there are as many images
    as captions, or ``(N_img + N_txt,)`` = image labels followed by caption labels. The model's
    ``a``, ``b`` and ``positive_mask`` (checked, otherwise unused) play no role.

    Args:
        num_classes: number of classes (CUB: 200, or 150 seen classes).
        embed_dim: size of the joint embedding (the model passes its own).
    """

    uses_match_parameters = False

    def __init__(self, num_classes: int, embed_dim: int):
        super().__init__()
        if num_classes < 1 or embed_dim < 1:
            raise ValueError(f"num_classes and embed_dim must be >= 1, got {num_classes} and {embed_dim}.")
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.centers = nn.Parameter(torch.empty(num_classes, embed_dim))
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embed_dim={self.embed_dim}"

    def reset_parameters(self) -> None:
        nn.init.normal_(self.centers, mean=0.0, std=1.0 / math.sqrt(self.embed_dim))

    def _split_labels(self, labels: torch.Tensor | None, num_images: int, num_texts: int):
        if labels is None:
            raise ValueError("The center loss needs labels: pass labels=(N,) integer class ids.")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(f"labels must be a 1-D integer tensor of class ids, got {labels!r}.")
        if labels.shape[0] == num_images == num_texts:
            image_labels = text_labels = labels
        elif labels.shape[0] == num_images + num_texts:
            image_labels, text_labels = labels[:num_images], labels[num_images:]
        else:
            raise ValueError(
                f"labels must have N_img = N_txt entries or N_img + N_txt = {num_images + num_texts} entries "
                f"(image labels, then caption labels), got {labels.shape[0]} for {num_images} images and "
                f"{num_texts} captions."
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, num_classes={self.num_classes}), got range "
                f"[{int(labels.min())}, {int(labels.max())}]."
            )
        return image_labels, text_labels

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
        image_mean = require_single_mean(image, "image", "center")
        text_mean = require_single_mean(text, "text", "center")
        for mean, modality in ((image_mean, "image"), (text_mean, "text")):
            if mean.shape[-1] != self.embed_dim:
                raise ValueError(
                    f"{modality}.mean has size {mean.shape[-1]}, but the centres have embed_dim={self.embed_dim}."
                )
        if positive_mask is not None:
            resolve_positive_mask(positive_mask, image_mean.shape[0], text_mean.shape[0], image_mean.device)
        image_labels, text_labels = self._split_labels(labels, image_mean.shape[0], text_mean.shape[0])
        centers = at_least_float32(self.centers)
        loss = (image_mean - centers[image_labels.to(centers.device)]).pow(2).sum(-1).mean()
        loss = loss + (text_mean - centers[text_labels.to(centers.device)]).pow(2).sum(-1).mean()
        return loss_output({"center": loss})
