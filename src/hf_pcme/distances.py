"""Pairwise distances and match probabilities between two sets of embeddings.

Every pairwise computation of the package (losses, metrics, index) goes through this
module. All functions compute in float32 whatever the input dtype (mixed-precision safe)
and never materialise an ``(N, M, D)`` or ``(N, M, J, J, D)`` difference tensor: squared
distances come from one matrix product, ``||x - y||^2 = ||x||^2 + ||y||^2 - 2 x.y``.

References:
    PCME: Chun et al., "Probabilistic Embeddings for Cross-Modal Retrieval", CVPR 2021.
    PCME++: Chun, "Improved Probabilistic Image-Text Representations", ICLR 2024.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

#: Added under the square root of sample distances, as in PCME: d = sqrt(||x - y||^2 + eps).
SAMPLE_DISTANCE_EPS = 1e-6


def _check_last_dim(name_x: str, x: torch.Tensor, name_y: str, y: torch.Tensor) -> None:
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"{name_x} and {name_y} must have the same embedding size, got {tuple(x.shape)} and {tuple(y.shape)}."
        )


def pairwise_squared_l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``||x_i - y_j||^2`` of ``x (N, D)`` and ``y (M, D)``, shape ``(N, M)``.

    Computed as ``||x||^2 + ||y||^2 - 2 x y^T`` in float32 and clamped at 0 (the product form can
    go slightly negative through cancellation).
    """
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"x and y must be 2-D (N, D) and (M, D), got {tuple(x.shape)} and {tuple(y.shape)}.")
    _check_last_dim("x", x, "y", y)
    x = x.float()
    y = y.float()
    x_sq = x.pow(2).sum(-1, keepdim=True)
    y_sq = y.pow(2).sum(-1).unsqueeze(0)
    return torch.addmm(x_sq + y_sq, x, y.t(), alpha=-2.0).clamp_min_(0.0)


def pairwise_csd(
    mean_x: torch.Tensor,
    log_sigma2_x: torch.Tensor,
    mean_y: torch.Tensor,
    log_sigma2_y: torch.Tensor,
) -> torch.Tensor:
    """Closed-form sampled distance (PCME++), shape ``(N, M)``.

    ``d(x, y) = ||mu_x - mu_y||^2 + sum_d sigma_x^2 + sum_d sigma_y^2``, the expected squared
    distance between a sample of ``N(mu_x, sigma_x^2)`` and one of ``N(mu_y, sigma_y^2)``.
    """
    _check_last_dim("mean_x", mean_x, "log_sigma2_x", log_sigma2_x)
    _check_last_dim("mean_y", mean_y, "log_sigma2_y", log_sigma2_y)
    var_x = log_sigma2_x.float().exp().sum(-1)
    var_y = log_sigma2_y.float().exp().sum(-1)
    return pairwise_squared_l2(mean_x, mean_y) + var_x.unsqueeze(1) + var_y.unsqueeze(0)


def sample_gaussian(
    mean: torch.Tensor, log_sigma2: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``J = num_samples`` reparameterised samples ``mean + exp(0.5 log_sigma2) * eps``, shape ``(B, J, D)``.

    Samples are not re-normalised (as in PCME).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    eps = torch.randn(
        (mean.shape[0], num_samples, mean.shape[-1]),
        dtype=mean.dtype,
        device=mean.device,
        generator=generator,
    )
    return mean.unsqueeze(1) + torch.exp(0.5 * log_sigma2).unsqueeze(1) * eps


def sampled_match_logits(distance: torch.Tensor, negative_scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-sample-pair match logit ``2 * (-a * d + b)``.

    PCME's "sigmoid" is ``e^s / (e^s + e^-s) = sigmoid(2 s)``; keeping the factor 2 here means the
    published initial values of ``a`` (negative_scale) and ``b`` (shift) mean the same thing.
    """
    return 2.0 * (shift - negative_scale * distance)


def pairwise_sampled_match_log_prob(
    samples_x: torch.Tensor,
    samples_y: torch.Tensor,
    negative_scale: torch.Tensor | float,
    shift: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo match log-probabilities of PCME, each of shape ``(N, M)``.

    ``p(m | x, y) = 1/(J J') sum_{j, j'} sigmoid(2 (-a d_jj' + b))`` with
    ``d_jj' = sqrt(||z_x^j - z_y^j'||^2 + 1e-6)``. Returns ``(log p, log (1 - p))``, both computed
    stably as a logsumexp over the ``J J'`` sample pairs of ``logsigmoid(+-logit)`` minus ``log(J J')``.

    Args:
        samples_x: ``(N, J, D)`` samples.
        samples_y: ``(M, J', D)`` samples.
        negative_scale: ``a`` (> 0), scalar tensor or float.
        shift: ``b``, scalar tensor or float.
    """
    if samples_x.dim() != 3 or samples_y.dim() != 3:
        raise ValueError(
            "samples_x and samples_y must be 3-D (N, J, D) and (M, J', D), "
            f"got {tuple(samples_x.shape)} and {tuple(samples_y.shape)}."
        )
    _check_last_dim("samples_x", samples_x, "samples_y", samples_y)
    n, j_x, _ = samples_x.shape
    m, j_y, _ = samples_y.shape
    squared = pairwise_squared_l2(samples_x.reshape(n * j_x, -1), samples_y.reshape(m * j_y, -1))
    distance = torch.sqrt(squared + SAMPLE_DISTANCE_EPS).view(n, j_x, m, j_y)
    logits = sampled_match_logits(distance, torch.as_tensor(negative_scale).float(), torch.as_tensor(shift).float())
    log_count = math.log(j_x * j_y)
    log_p = torch.logsumexp(F.logsigmoid(logits), dim=(1, 3)) - log_count
    log_not_p = torch.logsumexp(F.logsigmoid(-logits), dim=(1, 3)) - log_count
    return log_p, log_not_p


def iter_row_chunks(num_rows: int, chunk_size: int) -> Iterator[slice]:
    """Yield ``slice`` objects covering ``range(num_rows)`` in pieces of at most ``chunk_size``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    for start in range(0, num_rows, chunk_size):
        yield slice(start, min(start + chunk_size, num_rows))


def chunked_pairwise(
    fn: Callable[..., torch.Tensor],
    xs: tuple[torch.Tensor, ...],
    ys: tuple[torch.Tensor, ...],
    chunk_size: int = 1024,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Apply a pairwise function to row chunks of ``xs``: yields ``(row_slice, fn(*xs[row_slice], *ys))``.

    Lets a caller reduce each ``(chunk, M)`` block (top-k, counts, ...) without ever holding the
    full ``(N, M)`` matrix.
    """
    num_rows = xs[0].shape[0]
    for rows in iter_row_chunks(num_rows, chunk_size):
        yield rows, fn(*(x[rows] for x in xs), *ys)
