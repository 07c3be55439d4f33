"""PCME's sampled match probability for ranking: forward only, one product per tile, fused per tile.

PCME (Chun et al., "Probabilistic Embeddings for Cross-Modal Retrieval", CVPR 2021; see
docs/formulas.md, "Match probability") ranks by

    p(m | x, y) = 1/(J J') sum_{j, j'} sigmoid(2 (b - a d_jj')),   d_jj' = sqrt(||z_x^j - z_y^j'||^2 + 1e-6)

over the ``J x J'`` sample pairs of two items. :func:`sampled_match_log_prob` returns ``log p`` for
every pair of ``N`` queries and ``M`` items, the same values as
:func:`hf_pcme.distances.pairwise_sampled_match_log_prob` (which also returns ``log (1 - p)`` and
has a backward pass, for training) up to float32 round-off, at a cost close to the ``J J'`` matrix
products that any exact computation needs:

- Queries and items are processed in tiles of ``R`` queries x ``C`` items. The samples of the
  ``R`` queries are stacked sample-major, ``(J R, D)``; each of the ``J'`` sample slots of the items
  is a strided ``(C, D)`` view of the ``(M, J', D)`` samples (no copy), so a tile is ``J'``
  products written side by side into one ``(J, R, J', C)`` buffer: every ``J x J'`` distance of
  the tile comes from products, ``||x||^2 + ||y||^2 - 2 x.y`` (clamped at 0 before the ``+ 1e-6``
  and the square root, as in :mod:`hf_pcme.distances`).
- The rest is a handful of in-place passes over that buffer while it is still in the CPU cache
  (or GPU memory): the distance, ``s = 2 (b - a d)``, ``sigmoid(s)``, and the sum over the
  ``J x J'`` sample pairs (contiguous rows of ``C`` values, so the sum vectorises). Then
  ``log p = log(sum / (J J'))``.
- Where that float32 sum cannot give ``log p`` to float32 accuracy it is recomputed exactly, in log
  space, with the formula of :mod:`hf_pcme.distances` (log-mean-exp of ``logsigmoid(s)``):
  ``p > 1/2`` (``log p`` is then ``-(1 - p)`` to first order, which a sum of sigmoids near 1
  cannot resolve) and ``p`` below :data:`UNDERFLOW_SUM` (the sigmoids approach float32's
  smallest normal number). Retrieval scores have few such pairs; a tile row with many is
  recomputed whole by :func:`hf_pcme.distances.pairwise_sampled_match_log_prob`.
- Work memory is bounded by ``max_memory`` (the tile buffer, one per CPU thread); the ``(N, M)``
  result is the caller's (``out``).
- On CPU the tile rows run as tasks on torch's number of threads, each with torch on one thread:
  torch's own threads would split every small product and pass of a tile and meet at a barrier
  after each, and on a busy machine one descheduled thread then stalls the others.

All arithmetic is float32 (float64 for float64 inputs) with autocast off, so it is safe under
mixed precision, on CPU and CUDA alike. It runs under ``torch.no_grad``: use
:func:`hf_pcme.distances.pairwise_sampled_match_log_prob` for gradients.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from .cpu_threads import single_cpu_thread
from .distances import (
    SAMPLE_DISTANCE_EPS,
    _check_dims,
    _check_last_dim,
    _compute_dtype,
    _full_precision,
    _log_mean_exp_over_samples,
    iter_row_chunks,
    pairwise_sampled_match_log_prob,
)

#: Default work memory of one tile on CPU (bytes): the tile buffer stays in the cache (L2 and the
#: core's share of L3) between the products and the element-wise passes.
CPU_TILE_BYTES = 1 << 21
#: Default work memory of one tile on GPU (bytes): large enough for full-speed products.
GPU_TILE_BYTES = 1 << 28
#: Query samples stacked per tile row on CPU: ``J R`` rows of the products (a few hundred keeps
#: the products near the BLAS peak).
CPU_QUERY_SAMPLE_ROWS = 256
#: Sums of ``J J'`` sigmoids below this are recomputed in log space (float32's smallest normal
#: number is 1.2e-38; above 1e-30 even the largest term keeps every digit).
UNDERFLOW_SUM = 1e-30
#: A tile row with more than this fraction of its pairs to recompute is recomputed whole.
WHOLE_ROW_RECOMPUTE_FRACTION = 0.02
#: Pairs recomputed in log space per batched product (bounds that path's memory).
EXACT_PAIRS_PER_BATCH = 512


def _check_inputs(samples_x, samples_y, negative_scale, shift, max_memory, out):
    for name, samples, layout in (("samples_x", samples_x, "(N, J, D)"), ("samples_y", samples_y, "(M, J', D)")):
        _check_dims(name, samples, 3, layout)
        if not samples.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating point tensor, got {samples.dtype}.")
        if 0 in samples.shape:
            raise ValueError(f"{name} needs at least one item, one sample and one dimension, got {tuple(samples.shape)}.")
    _check_last_dim("samples_x", samples_x, "samples_y", samples_y)
    if samples_x.device != samples_y.device:
        raise ValueError(f"samples_x and samples_y must be on one device, got {samples_x.device} and {samples_y.device}.")
    scalars = []
    for name, value in (("negative_scale", negative_scale), ("shift", shift)):
        value = torch.as_tensor(value).detach()
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(value.shape)}.")
        value = float(value.reshape(()))
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}.")
        scalars.append(value)
    if max_memory is not None and int(max_memory) < 1:
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory}.")
    if out is not None:
        shape = (samples_x.shape[0], samples_y.shape[0])
        dtype = _compute_dtype(samples_x, samples_y)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != dtype:
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"out must be a {shape} {dtype} tensor, got {got}.")
        if out.device != samples_x.device:
            raise ValueError(f"out must be on the device of the samples ({samples_x.device}), got {out.device}.")
        if out.stride(-1) != 1:
            raise ValueError("out must have contiguous rows (stride 1 in its last dimension).")
    return scalars


def _tile_shape(n: int, m: int, j_x: int, j_y: int, item_size: int, device: torch.device, max_memory: int | None,
                threads: int) -> tuple[int, int]:
    """``(R, C)``: queries and items per tile, the ``(J R) x (J' C)`` tile buffer within ``max_memory``."""
    default = CPU_TILE_BYTES if device.type == "cpu" else GPU_TILE_BYTES
    budget = max(1, (int(max_memory) if max_memory is not None else default) // item_size)
    rows = max(1, min(n, CPU_QUERY_SAMPLE_ROWS // j_x)) if device.type == "cpu" else n
    # at least one query and one item per tile
    while rows > 1 and rows * j_x * j_y > budget:
        rows = (rows + 1) // 2
    # as many tile rows for each thread, of nearly equal sizes (no short last one)
    tile_rows = threads * -(-n // (threads * rows))
    rows = -(-n // tile_rows)
    cols = max(1, min(m, budget // (rows * j_x * j_y)))
    return rows, cols


def sampled_match_log_prob(
    samples_x: torch.Tensor,
    samples_y: torch.Tensor,
    negative_scale: torch.Tensor | float,
    shift: torch.Tensor | float,
    *,
    max_memory: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log p(match)`` of PCME for every pair of ``N`` queries and ``M`` items, shape ``(N, M)``.

    ``p = 1/(J J') sum_{j, j'} sigmoid(2 (b - a d_jj'))`` with ``d_jj' = sqrt(||z_x^j - z_y^j'||^2 + 1e-6)``
    (PCME, Chun et al., CVPR 2021; docs/formulas.md, "Match probability"). Equal to the ``log p`` of
    :func:`hf_pcme.distances.pairwise_sampled_match_log_prob` up to float32 round-off; computed as
    described in the module docstring (forward only, no gradient).

    Args:
        samples_x: ``(N, J, D)`` query samples.
        samples_y: ``(M, J', D)`` item samples.
        negative_scale: ``a``, a scalar tensor (one element) or float.
        shift: ``b``, a scalar tensor or float.
        max_memory: bytes of the tile buffer, ``(J R) x (J' C)`` values (default: 2 MiB on CPU, which
            stays in the cache; 256 MiB on GPU). On CPU each of torch's threads has one. Not
            counted: the ``(J R, D)`` stacked query samples of a tile, the ``(M, J')`` item norms
            and the ``(N, M)`` result.
        out: optional ``(N, M)`` tensor for the result (float32, float64 for float64 samples), on
            the samples' device.
    """
    negative_scale, shift = _check_inputs(samples_x, samples_y, negative_scale, shift, max_memory, out)
    dtype = _compute_dtype(samples_x, samples_y)
    device = samples_x.device
    n, j_x, dim = samples_x.shape
    m, j_y, _ = samples_y.shape
    with torch.no_grad(), _full_precision(device):
        samples_x = samples_x.to(dtype)
        samples_y = samples_y.to(dtype)
        if samples_y.stride(-1) != 1 or samples_y.stride(1) != dim or samples_y.stride(0) != j_y * dim:
            samples_y = samples_y.contiguous()
        if out is None:
            out = torch.empty(n, m, dtype=dtype, device=device)
        threads = torch.get_num_threads() if device.type == "cpu" else 1
        rows, cols = _tile_shape(n, m, j_x, j_y, samples_y.element_size(), device, max_memory, threads)
        items_sq_eps = torch.empty(m, j_y, dtype=dtype, device=device)
        for items in iter_row_chunks(m, max(1, (1 << 22) // (j_y * dim))):  # bounded temporaries
            torch.sum(samples_y[items].square(), dim=-1, out=items_sq_eps[items])
        items_sq_eps.add_(SAMPLE_DISTANCE_EPS)
        arguments = (out, samples_x, samples_y, items_sq_eps, negative_scale, shift, cols, threading.local())
        _run_tasks(_score_queries, list(iter_row_chunks(n, rows)), arguments, threads)
    return out


def _run_tasks(function, tasks: list, arguments: tuple, threads: int) -> None:
    """``function(task, *arguments)`` for each task; on ``threads`` threads with torch on one thread each."""
    if threads <= 1 or len(tasks) == 1:
        for task in tasks:
            function(task, *arguments)
        return
    with single_cpu_thread(), ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(function, task, *arguments) for task in tasks]:
            future.result()


def _score_queries(queries, out, samples_x, samples_y, items_sq_eps, negative_scale, shift, cols, local):
    """Fill ``out[queries]``, ``cols`` items per tile; ``local`` keeps one tile buffer per thread."""
    j_x, dim = samples_x.shape[1:]
    m, j_y = items_sq_eps.shape
    num_queries = queries.stop - queries.start
    size = j_x * num_queries * j_y * min(cols, m)
    if getattr(local, "buffer", None) is None or local.buffer.numel() < size:
        local.buffer = samples_x.new_empty(size)
    with torch.no_grad(), _full_precision(samples_x.device):  # both are per thread
        stacked = samples_x[queries].transpose(0, 1).reshape(-1, dim)  # (J R, D), sample-major
        stacked_sq = stacked.square().sum(-1).view(-1, 1, 1)
        for items in iter_row_chunks(m, cols):
            num_items = items.stop - items.start
            block = local.buffer[: j_x * num_queries * j_y * num_items].view(j_x * num_queries, j_y, num_items)
            for slot in range(j_y):
                # ||y||^2 + eps - 2 x.y, one product per sample slot of the items (a strided view)
                torch.addmm(
                    items_sq_eps[items, slot], stacked, samples_y[items, slot].t(), alpha=-2.0, out=block[:, slot]
                )
            # d = sqrt(max(q, 0) + eps), s = 2 b - 2 a d, sigmoid(s): in place while the tile is in cache
            block.add_(stacked_sq).clamp_min_(SAMPLE_DISTANCE_EPS).sqrt_()
            block.mul_(-2.0 * negative_scale).add_(2.0 * shift).sigmoid_()
            out[queries, items] = block.sum(1).view(j_x, num_queries, num_items).sum(0)
        _finish_rows(out[queries], samples_x[queries], samples_y, items_sq_eps, negative_scale, shift, j_x * j_y)




def _finish_rows(scores, samples_x, samples_y, items_sq_eps, negative_scale, shift, num_pairs):
    """Sums of sigmoids -> ``log p`` in place; the pairs a float32 sum cannot resolve, in log space."""
    recompute = (scores > 0.5 * num_pairs) | (scores < UNDERFLOW_SUM) | ~torch.isfinite(scores)
    scores.div_(num_pairs).log_()
    count = int(recompute.sum())
    if count == 0:
        return
    if count > WHOLE_ROW_RECOMPUTE_FRACTION * recompute.numel():
        exact = pairwise_sampled_match_log_prob(samples_x, samples_y, negative_scale, shift)[0]
        scores[recompute] = exact[recompute].to(scores.dtype)
        return
    query_index, item_index = recompute.nonzero(as_tuple=True)
    for batch in iter_row_chunks(count, EXACT_PAIRS_PER_BATCH):
        queries, items = query_index[batch], item_index[batch]
        scores[queries, items] = _pair_log_prob(
            samples_x[queries], samples_y[items], items_sq_eps[items], negative_scale, shift
        ).to(scores.dtype)


def _pair_log_prob(samples_x, samples_y, items_sq_eps, negative_scale, shift):
    """``log p`` of the pairs ``(samples_x[k], samples_y[k])``, ``(K, J, D)`` and ``(K, J', D)`` -> ``(K,)``,
    in log space as :func:`hf_pcme.distances.pairwise_sampled_match_log_prob` computes it."""
    squared_eps = torch.baddbmm(items_sq_eps.unsqueeze(1), samples_x, samples_y.transpose(1, 2), alpha=-2.0)
    squared_eps.add_(samples_x.square().sum(-1).unsqueeze(2))
    distance = squared_eps.clamp_min_(SAMPLE_DISTANCE_EPS).sqrt_()
    log_sigmoids = F.logsigmoid(distance.mul_(-2.0 * negative_scale).add_(2.0 * shift))
    return _log_mean_exp_over_samples(log_sigmoids.unsqueeze(2)).squeeze(1)


def rerank_top_k(
    candidate_scores: torch.Tensor,
    samples_x: torch.Tensor,
    samples_y: torch.Tensor,
    negative_scale: torch.Tensor | float,
    shift: torch.Tensor | float,
    top_k: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows of scores where each query's ``top_k`` candidates are re-scored by ``log p(match)``.

    ``candidate_scores`` ``(N, M)`` (higher = better, e.g. ``-CSD``, PCME++'s closed-form sampled
    distance) chooses, per query, the ``top_k`` items that get their sampled ``log p`` (as
    :func:`sampled_match_log_prob`, in log space); every other item gets
    ``min(top log p) - 1 - (kth candidate score - its candidate score)``: below all re-scored
    items, in candidate order. A ranking by these rows is the candidate ranking with its first
    ``top_k`` places re-ordered by the sampled match probability; it equals the exact sampled
    ranking wherever the exact top items are among the candidates.

    Args:
        candidate_scores: ``(N, M)`` scores of the queries ``samples_x`` against the items ``samples_y``.
        samples_x, samples_y: ``(N, J, D)`` and ``(M, J', D)`` samples.
        negative_scale, shift: PCME's ``a`` and ``b``.
        top_k: candidates re-scored per query, ``1 <= top_k``; at least ``M`` re-scores every item.
        out: optional ``(N, M)`` result tensor (may be ``candidate_scores`` itself).
    """
    negative_scale, shift = _check_inputs(samples_x, samples_y, negative_scale, shift, None, None)
    if not isinstance(candidate_scores, torch.Tensor) or tuple(candidate_scores.shape) != (
        samples_x.shape[0],
        samples_y.shape[0],
    ):
        got = tuple(candidate_scores.shape) if isinstance(candidate_scores, torch.Tensor) else type(candidate_scores)
        raise ValueError(
            f"candidate_scores must be a ({samples_x.shape[0]}, {samples_y.shape[0]}) tensor (queries x items), got {got}."
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    dtype = _compute_dtype(samples_x, samples_y)
    top_k = min(top_k, samples_y.shape[0])
    device = samples_x.device
    with torch.no_grad(), _full_precision(device):
        candidates = candidate_scores.to(dtype)
        values, indices = candidates.topk(top_k, dim=1)
        if out is None:
            out = torch.empty_like(candidates)
        samples_x = samples_x.to(dtype)
        samples_y = samples_y.to(dtype)
        threads = torch.get_num_threads() if device.type == "cpu" else 1
        arguments = (out, candidates, values, indices, samples_x, samples_y, negative_scale, shift)
        _run_tasks(_rerank_queries, list(iter_row_chunks(samples_x.shape[0], 64)), arguments, threads)
    return out


def _rerank_queries(queries, out, candidates, values, indices, samples_x, samples_y, negative_scale, shift):
    """Rows ``queries`` of :func:`rerank_top_k`: one product per query with its gathered candidates."""
    j_x, dim = samples_x.shape[1:]
    top_k = indices.shape[1]
    with torch.no_grad(), _full_precision(samples_x.device):  # both are per thread
        for query in range(queries.start, queries.stop):
            chosen = indices[query]
            items = samples_y[chosen].reshape(-1, dim)  # (K J', D)
            # (J, K J') distances of one product, then log-mean-exp of log sigmoid as in hf_pcme.distances
            squared_eps = torch.addmm(items.square().sum(-1).add_(SAMPLE_DISTANCE_EPS), samples_x[query], items.t(), alpha=-2.0)
            squared_eps.add_(samples_x[query].square().sum(-1, keepdim=True))
            distance = squared_eps.clamp_min_(SAMPLE_DISTANCE_EPS).sqrt_()
            log_sigmoids = F.logsigmoid(distance.mul_(-2.0 * negative_scale).add_(2.0 * shift))
            log_p = _log_mean_exp_over_samples(log_sigmoids.view(1, j_x, top_k, -1))[0]
            row = out[query]
            if row.data_ptr() != candidates[query].data_ptr():
                row.copy_(candidates[query])
            # the others: below every re-scored item, in candidate order
            row.sub_(values[query, -1]).add_(log_p.min() - 1.0)
            row[chosen] = log_p.to(row.dtype)
