"""Input checks and small formulas shared by the losses (``loss_*.py``).

Every loss takes two :class:`~.outputs.ProbabilisticEmbedding` (images, captions), an optional
``(N_img, N_txt)`` bool ``positive_mask`` (``None`` = the diagonal), and keyword-only extras. The
helpers here turn bad input into a ``ValueError`` that names the argument and says what to do.
"""

from __future__ import annotations

import torch

from .outputs import LossOutput, ProbabilisticEmbedding

_PROBABILISTIC_HINT = 'build the model with head_type="probabilistic"'


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32, or float64 if it already is (half types are upcast, never the reverse)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def resolve_positive_mask(
    positive_mask: torch.Tensor | None, num_images: int, num_texts: int, device: torch.device
) -> torch.Tensor:
    """The ``(num_images, num_texts)`` bool mask of matching pairs; ``None`` means the diagonal."""
    if positive_mask is None:
        if num_images != num_texts:
            raise ValueError(
                f"positive_mask=None means image i matches caption i, which needs as many images as captions "
                f"(got {num_images} images and {num_texts} captions); pass a bool positive_mask of shape "
                f"({num_images}, {num_texts})."
            )
        return torch.eye(num_images, dtype=torch.bool, device=device)
    if not isinstance(positive_mask, torch.Tensor):
        raise ValueError(f"positive_mask must be a bool torch.Tensor or None, got {type(positive_mask).__name__}.")
    if positive_mask.dtype != torch.bool:
        raise ValueError(
            f"positive_mask must have dtype torch.bool (True = matching pair), got {positive_mask.dtype}; "
            "convert it with `.bool()`."
        )
    if tuple(positive_mask.shape) != (num_images, num_texts):
        raise ValueError(
            f"positive_mask must have shape (N_img, N_txt) = ({num_images}, {num_texts}), "
            f"got {tuple(positive_mask.shape)}."
        )
    return positive_mask.to(device)


def check_soft_targets(soft_targets: torch.Tensor, positive_mask: torch.Tensor) -> torch.Tensor:
    """Soft match targets ``(N_img, N_txt)`` in [0, 1] (e.g. mixed images), checked against ``positive_mask``'s shape."""
    if not isinstance(soft_targets, torch.Tensor) or not soft_targets.is_floating_point():
        raise ValueError("soft_targets must be a float torch.Tensor of match targets in [0, 1], "
                         f"got {type(soft_targets).__name__} {getattr(soft_targets, 'dtype', '')}.")
    if soft_targets.shape != positive_mask.shape:
        raise ValueError(f"soft_targets must have the shape of the positive mask {tuple(positive_mask.shape)}, "
                         f"got {tuple(soft_targets.shape)}.")
    if not bool(((soft_targets >= 0) & (soft_targets <= 1)).all()):
        raise ValueError("soft_targets must lie in [0, 1] (NaN is refused too).")
    return soft_targets.to(positive_mask.device)


def match_parameters(
    negative_scale: torch.Tensor | None, shift: torch.Tensor | None, loss_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` as (at least) float32 0-dim tensors (gradients flow back to the model's parameters)."""
    for name, value in (("negative_scale", negative_scale), ("shift", shift)):
        if value is None:
            raise ValueError(
                f"The {loss_name} loss needs the model's learnable match parameters: pass negative_scale=a "
                f"and shift=b (scalar tensors, e.g. model.negative_scale and model.shift); {name} is None."
            )
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"{name} must be a one-element torch.Tensor, got {value!r}.")
    return at_least_float32(negative_scale).reshape(()), at_least_float32(shift).reshape(())


def require_samples(embedding: ProbabilisticEmbedding, modality: str, loss_name: str) -> torch.Tensor:
    """The ``(B, J, D)`` samples of one modality, or a ValueError when the head did not sample."""
    samples = embedding.samples
    if samples is None:
        raise ValueError(
            f"The {loss_name} loss needs Monte-Carlo samples of the {modality} embeddings, but "
            f"{modality}.samples is None; {_PROBABILISTIC_HINT} (and num_samples >= 1)."
        )
    if samples.dim() != 3:
        raise ValueError(f"{modality}.samples must be (B, J, D), got shape {tuple(samples.shape)}.")
    return samples


def require_log_sigma2(embedding: ProbabilisticEmbedding, modality: str, loss_name: str) -> torch.Tensor:
    """The ``(B, D)`` log variances of one modality, or a ValueError for deterministic heads."""
    log_sigma2 = embedding.log_sigma2
    if log_sigma2 is None:
        raise ValueError(
            f"The {loss_name} loss needs variances, but {modality}.log_sigma2 is None; {_PROBABILISTIC_HINT}."
        )
    if embedding.mean is not None and log_sigma2.shape != embedding.mean.shape:
        raise ValueError(
            f"{modality}.log_sigma2 must have the shape of {modality}.mean {tuple(embedding.mean.shape)}, "
            f"got {tuple(log_sigma2.shape)}."
        )
    return log_sigma2


def require_single_mean(embedding: ProbabilisticEmbedding, modality: str, loss_name: str) -> torch.Tensor:
    """The ``(B, D)`` mean of one modality in (at least) float32; polysemous ``(B, K, D)`` means are refused."""
    mean = embedding.mean
    if mean is None or mean.dim() != 2:
        shape = None if mean is None else tuple(mean.shape)
        raise ValueError(
            f"The {loss_name} loss needs one (B, D) mean per item, got {modality}.mean of shape {shape}; "
            'polysemous (B, K, D) embeddings go with loss_type="pvse".'
        )
    return at_least_float32(mean)


def gaussian_kl_to_standard_normal(mean: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """Element-wise ``KL(N(mu, sigma^2) || N(0, 1)) = -0.5 (1 + log sigma^2 - mu^2 - sigma^2)``, >= float32."""
    mean = at_least_float32(mean)
    log_sigma2 = at_least_float32(log_sigma2)
    return -0.5 * (1.0 + log_sigma2 - mean.pow(2) - log_sigma2.exp())


def loss_output(terms: dict[str, torch.Tensor]) -> LossOutput:
    """``LossOutput`` whose ``loss`` is the sum of the weighted ``terms``; ``components`` are detached copies."""
    loss = torch.stack(list(terms.values())).sum()
    return LossOutput(loss=loss, components={name: value.detach() for name, value in terms.items()})
