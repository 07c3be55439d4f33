"""Pairwise distances and match probabilities between two sets of embeddings.

Every pairwise computation of the package (losses, metrics, index) goes through this
module. All functions compute in at least float32 whatever the input dtype (mixed-precision
safe; float64 stays float64, which the gradient checks use) and never materialise an
``(N, M, D)`` or ``(N, M, J, J, D)`` difference tensor: squared distances come from one matrix
product, ``||x - y||^2 = ||x||^2 + ||y||^2 - 2 x.y``.

The sampled match probability of PCME is the expensive one: ``N J x M J'`` sample distances.
:func:`pairwise_sampled_match_log_prob` processes it in row blocks and has its own backward
pass that recomputes each block instead of storing it, so training memory grows with
``N + M`` (the samples and their gradients), not with ``(N J) x (M J')``.

References:
    PCME: Chun et al., "Probabilistic Embeddings for Cross-Modal Retrieval", CVPR 2021.
    PCME++: Chun, "Improved Probabilistic Image-Text Representations", ICLR 2024.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

#: Added under the square root of sample distances, as in PCME: d = sqrt(||x - y||^2 + eps).
SAMPLE_DISTANCE_EPS = 1e-6

#: Elements of one ``(rows J) x (M J')`` block of the sampled match probability (16 MiB in
#: float32). At most about five blocks are alive at once (in the backward pass); larger blocks
#: hardly speed up the matrix products.
SAMPLED_MATCH_BLOCK_ELEMENTS = 1 << 22


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (never a half type)."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _full_precision(device: torch.device):
    """Switch autocast off: under mixed precision the matrix products here would run in half precision."""
    return torch.autocast(device_type=device.type, enabled=False)


def _check_dims(name: str, tensor: torch.Tensor, dims: int, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(tensor).__name__}.")
    if tensor.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {layout}, got shape {tuple(tensor.shape)}.")


def _check_last_dim(name_x: str, x: torch.Tensor, name_y: str, y: torch.Tensor) -> None:
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"{name_x} and {name_y} must have the same embedding size, got {tuple(x.shape)} and {tuple(y.shape)}."
        )


def _check_same_shape(name_x: str, x: torch.Tensor, name_y: str, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{name_y} must have the shape of {name_x} {tuple(x.shape)}, got {tuple(y.shape)}.")


def pairwise_squared_l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``||x_i - y_j||^2`` of ``x (N, D)`` and ``y (M, D)``, shape ``(N, M)``.

    Computed as ``||x||^2 + ||y||^2 - 2 x y^T`` in float32 (float64 for float64 inputs) and
    clamped at 0 (the product form can go slightly negative through cancellation).
    """
    _check_dims("x", x, 2, "(N, D)")
    _check_dims("y", y, 2, "(M, D)")
    _check_last_dim("x", x, "y", y)
    dtype = _compute_dtype(x, y)
    with _full_precision(x.device):
        x = x.to(dtype)
        y = y.to(dtype)
        x_sq = x.pow(2).sum(-1, keepdim=True)
        y_sq = y.pow(2).sum(-1).unsqueeze(0)
        return torch.addmm(x_sq + y_sq, x, y.t(), alpha=-2.0).clamp_min(0.0)


def best_pair_scores(scores: torch.Tensor, num_rows: int, row_embeds: int, column_embeds: int) -> torch.Tensor:
    """``(N * K, M * K')`` scores of single embeddings -> ``(N, M)``: the best of each item pair's K x K' scores.

    PVSE's multiple-instance similarity ``s_ij = max_{k, k'} s(x_i^k, y_j^k')`` (Song & Soleymani,
    CVPR 2019); rows and columns list the K embeddings of an item consecutively. K = K' = 1 returns
    ``scores`` itself.
    """
    if row_embeds == 1 and column_embeds == 1:
        return scores
    return scores.view(num_rows, row_embeds, -1, column_embeds).amax(dim=(1, 3))


def max_pair_similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{k, k'} <x_i^k, y_j^k'>`` of ``(N, K, D)`` and ``(M, K', D)`` embeddings, shape ``(N, M)``."""
    _check_dims("x", x, 3, "(N, K, D)")
    _check_dims("y", y, 3, "(M, K', D)")
    _check_last_dim("x", x, "y", y)
    scores = x.reshape(-1, x.shape[-1]) @ y.reshape(-1, y.shape[-1]).t()
    return best_pair_scores(scores, x.shape[0], x.shape[1], y.shape[1])


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
    _check_dims("mean_x", mean_x, 2, "(N, D)")
    _check_dims("mean_y", mean_y, 2, "(M, D)")
    _check_dims("log_sigma2_x", log_sigma2_x, 2, "(N, D)")
    _check_dims("log_sigma2_y", log_sigma2_y, 2, "(M, D)")
    _check_same_shape("mean_x", mean_x, "log_sigma2_x", log_sigma2_x)
    _check_same_shape("mean_y", mean_y, "log_sigma2_y", log_sigma2_y)
    dtype = _compute_dtype(mean_x, mean_y, log_sigma2_x, log_sigma2_y)
    var_x = log_sigma2_x.to(dtype).exp().sum(-1)
    var_y = log_sigma2_y.to(dtype).exp().sum(-1)
    return pairwise_squared_l2(mean_x, mean_y) + var_x.unsqueeze(1) + var_y.unsqueeze(0)


def sample_gaussian(
    mean: torch.Tensor, log_sigma2: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``J = num_samples`` reparameterised samples ``mean + exp(0.5 log_sigma2) * eps``, shape ``(B, J, D)``.

    Samples are not re-normalised (as in PCME).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    _check_dims("mean", mean, 2, "(B, D)")
    _check_same_shape("mean", mean, "log_sigma2", log_sigma2)
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


def _block_log_sigmoids(
    rows: torch.Tensor,
    rows_sq: torch.Tensor,
    columns_t: torch.Tensor,
    columns_sq_eps: torch.Tensor,
    negative_scale: torch.Tensor,
    shift: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distances ``d``, ``log sigmoid(s)`` and ``log sigmoid(-s)`` of one ``(R, C)`` block of sample pairs.

    ``columns_sq_eps`` is ``||y||^2 + eps``: with it, ``clamp(q + eps, min=eps) = max(q, 0) + eps``.
    Each step works in place where it can: the block is the only large memory here.
    """
    squared_eps = torch.addmm(columns_sq_eps, rows, columns_t, alpha=-2.0).add_(rows_sq.unsqueeze(1))
    distance = squared_eps.clamp_min_(SAMPLE_DISTANCE_EPS).sqrt_()
    # sampled_match_logits(distance, a, b) = 2 b - 2 a d, in one pass.
    logits = torch.addcmul(2.0 * shift, distance, -2.0 * negative_scale)
    log_sig_pos = F.logsigmoid(logits)
    # Not log sigmoid(s) - s: for s << 0 that subtracts two numbers close to s and loses log(1 - p).
    log_sig_neg = F.logsigmoid(logits.neg_())
    return distance, log_sig_pos, log_sig_neg


def _log_mean_exp_over_samples(values: torch.Tensor) -> torch.Tensor:
    """``log mean_{j, j'} exp(values)`` over dims 1 and 3 of a ``(R, J, M, J')`` block, shape ``(R, M)``.

    Written ``max + log1p(mean(expm1(values - max)))`` rather than ``logsumexp - log(J J')``: when
    the result is close to 0 (a match probability near 0 or 1, e.g. ``log(1 - p)`` for p ~ 1e-7)
    the latter subtracts two numbers close to ``log(J J')`` and keeps no correct digit in float32.
    Here the mean lies in ``(-1 + 1/(J J'), 0]``, where ``log1p`` is well conditioned.
    """
    top = values.amax(dim=(1, 3), keepdim=True)
    mean = torch.sub(values, top).expm1_().mean(dim=(1, 3))
    return top.squeeze(3).squeeze(1) + torch.log1p(mean)


class _SampledMatchLogProb(torch.autograd.Function):
    """``(log p, log (1 - p))`` of PCME's Monte-Carlo match probability, block by block.

    Forward keeps only the ``(N, M)`` outputs. Backward recomputes each block's distances and
    uses the closed-form derivative, with ``s = 2 (b - a d)``, ``sigma = sigmoid``:
        d log p / d s_jj'       =  sigma(s) sigma(-s) / sum_jj' sigma(s)
        d log (1-p) / d s_jj'   = -sigma(s) sigma(-s) / sum_jj' sigma(-s)
    evaluated in log space (``exp(log sigma(s) + log sigma(-s) - logsumexp)``, every exponent <= 0),
    then ``ds/dd = -2a``, ``dd/dq = 1 / (2 d)`` for ``q = ||x - y||^2``, and
    ``dq/dx = 2 (x - y)``, which turns into two matrix products per block.
    """

    @staticmethod
    def forward(ctx, samples_x, samples_y, negative_scale, shift, rows_per_block):  # noqa: D102
        with _full_precision(samples_x.device):
            return _SampledMatchLogProb._forward(ctx, samples_x, samples_y, negative_scale, shift, rows_per_block)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_log_p, grad_log_not_p):  # noqa: D102
        with _full_precision(grad_log_p.device):
            return _SampledMatchLogProb._backward(ctx, grad_log_p, grad_log_not_p)

    @staticmethod
    def _forward(ctx, samples_x, samples_y, negative_scale, shift, rows_per_block):
        n, j_x, dim = samples_x.shape
        m, j_y, _ = samples_y.shape
        columns = samples_y.reshape(m * j_y, dim)
        columns_t = columns.t()
        columns_sq_eps = columns.pow(2).sum(-1) + SAMPLE_DISTANCE_EPS
        log_p = samples_x.new_empty(n, m)
        log_not_p = samples_x.new_empty(n, m)
        for items in iter_row_chunks(n, rows_per_block):
            rows = samples_x[items].reshape(-1, dim)
            _, log_sig_pos, log_sig_neg = _block_log_sigmoids(
                rows, rows.pow(2).sum(-1), columns_t, columns_sq_eps, negative_scale, shift
            )
            block = (-1, j_x, m, j_y)
            log_p[items] = _log_mean_exp_over_samples(log_sig_pos.view(block))
            log_not_p[items] = _log_mean_exp_over_samples(log_sig_neg.view(block))
        ctx.save_for_backward(samples_x, samples_y, negative_scale, shift, log_p, log_not_p)
        ctx.rows_per_block = rows_per_block
        return log_p, log_not_p

    @staticmethod
    def _backward(ctx, grad_log_p, grad_log_not_p):
        need_x, need_y, need_a, need_b, _ = ctx.needs_input_grad
        samples_x, samples_y, negative_scale, shift, log_p, log_not_p = ctx.saved_tensors
        n, j_x, dim = samples_x.shape
        m, j_y, _ = samples_y.shape
        log_count = math.log(j_x * j_y)
        # logsumexp over the J J' sample pairs, i.e. log sum_jj' sigma(+-s).
        lse_pos = (log_p + log_count).view(n, 1, m, 1)
        lse_neg = (log_not_p + log_count).view(n, 1, m, 1)
        grad_log_p = grad_log_p.reshape(n, 1, m, 1)
        grad_log_not_p = grad_log_not_p.reshape(n, 1, m, 1)

        columns = samples_y.reshape(m * j_y, dim)
        columns_t = columns.t()
        columns_sq_eps = columns.pow(2).sum(-1) + SAMPLE_DISTANCE_EPS
        grad_x = torch.empty_like(samples_x) if need_x else None
        grad_columns = torch.zeros_like(columns)  # accumulates -sum_i G_q[i, c] x_i
        column_weight = columns.new_zeros(m * j_y)  # accumulates sum_i G_q[i, c]
        grad_a = negative_scale.new_zeros(())
        grad_b = shift.new_zeros(())
        for items in iter_row_chunks(n, ctx.rows_per_block):
            rows = samples_x[items].reshape(-1, dim)
            distance, log_sig_pos, log_sig_neg = _block_log_sigmoids(
                rows, rows.pow(2).sum(-1), columns_t, columns_sq_eps, negative_scale, shift
            )
            log_sig_both = log_sig_pos.add_(log_sig_neg).view(-1, j_x, m, j_y)  # log sigma(s) sigma(-s)
            del log_sig_neg
            grad_s = (log_sig_both - lse_pos[items]).exp_().mul_(grad_log_p[items])
            grad_s.sub_(log_sig_both.sub_(lse_neg[items]).exp_().mul_(grad_log_not_p[items]))
            del log_sig_both
            grad_s = grad_s.view_as(distance)
            if need_b:
                grad_b += grad_s.sum()
            if need_a:
                grad_a += torch.dot(grad_s.view(-1), distance.view(-1))
            # dL/dq = G_s * (-2a) / (2d) = -a * grad_q; the -a is applied once to the (., D) results.
            grad_q = grad_s.div_(distance)
            del distance
            if need_x:
                row_weight = grad_q.sum(1, keepdim=True)
                grad_x[items] = torch.addmm(rows * row_weight, grad_q, columns, alpha=-1.0).view(-1, j_x, dim)
            if need_y:
                column_weight += grad_q.sum(0)
                grad_columns.addmm_(grad_q.t(), rows, alpha=-1.0)
        # dq/dx = 2 (x - y), times the -a of dL/dq.
        grad_x = grad_x.mul_(-2.0 * negative_scale) if need_x else None
        grad_y = (
            grad_columns.add_(columns * column_weight.unsqueeze(1)).mul_(-2.0 * negative_scale).view_as(samples_y)
            if need_y
            else None
        )
        return grad_x, grad_y, -2.0 * grad_a if need_a else None, 2.0 * grad_b if need_b else None, None


def pairwise_sampled_match_log_prob(
    samples_x: torch.Tensor,
    samples_y: torch.Tensor,
    negative_scale: torch.Tensor | float,
    shift: torch.Tensor | float,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo match log-probabilities of PCME, each of shape ``(N, M)``.

    ``p(m | x, y) = 1/(J J') sum_{j, j'} sigmoid(2 (-a d_jj' + b))`` with
    ``d_jj' = sqrt(||z_x^j - z_y^j'||^2 + 1e-6)``. Returns ``(log p, log (1 - p))``, both computed
    stably in log space as the log-mean-exp over the ``J J'`` sample pairs of ``logsigmoid(+-logit)``
    (accurate in float32 even for p within 1e-7 of 0 or 1, where ``log(1 - p)`` is tiny).

    Memory: the ``(N J) x (M J')`` sample distances are processed ``chunk_size`` items of
    ``samples_x`` at a time and recomputed (not stored) for the backward pass, so forward +
    backward hold O((N J + M J') D + block) memory. Differentiable in the samples, ``a`` and ``b``
    (first order only).

    Args:
        samples_x: ``(N, J, D)`` samples.
        samples_y: ``(M, J', D)`` samples.
        negative_scale: ``a`` (> 0), scalar tensor (any shape with one element) or float.
        shift: ``b``, scalar tensor or float.
        chunk_size: items of ``samples_x`` per block; default: as many as fit in
            :data:`SAMPLED_MATCH_BLOCK_ELEMENTS` sample pairs.
    """
    _check_dims("samples_x", samples_x, 3, "(N, J, D)")
    _check_dims("samples_y", samples_y, 3, "(M, J', D)")
    _check_last_dim("samples_x", samples_x, "samples_y", samples_y)
    dtype = _compute_dtype(samples_x, samples_y)
    device = samples_x.device
    scalars = []
    for name, value in (("negative_scale", negative_scale), ("shift", shift)):
        value = torch.as_tensor(value, device=device)
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(value.shape)}.")
        scalars.append(value.to(dtype).reshape(()))
    n = samples_x.shape[0]
    m, j_y = samples_y.shape[:2]
    if n == 0 or m == 0 or samples_x.shape[1] == 0 or j_y == 0:
        raise ValueError(
            f"samples_x and samples_y need at least one item and one sample each, "
            f"got {tuple(samples_x.shape)} and {tuple(samples_y.shape)}."
        )
    if chunk_size is None:
        chunk_size = max(1, SAMPLED_MATCH_BLOCK_ELEMENTS // (samples_x.shape[1] * m * j_y))
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    return _SampledMatchLogProb.apply(
        samples_x.to(dtype).contiguous(), samples_y.to(dtype).contiguous(), scalars[0], scalars[1], chunk_size
    )


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


# ---------------------------------------------------------------------------------------------
# Exact CSD ranking as an inner product: moved to hf_pcme.scoring (one encoding, CSDScore).
# The old names stay importable from here (resolved lazily: scoring imports this module).
# ---------------------------------------------------------------------------------------------
_MOVED_TO_SCORING = (
    "item_search_vectors", "query_search_vectors", "score_vectors", "as_embedding_rows", "SEARCH_VECTOR_CHUNK_ROWS"
)


def __getattr__(name: str):
    if name in _MOVED_TO_SCORING:
        from . import scoring

        return getattr(scoring, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
