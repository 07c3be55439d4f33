"""Gather embeddings across processes while keeping gradients, so contrastive losses see the global batch.

With data parallelism every process embeds its own slice of the batch, but a contrastive loss
(PCME's B x B match loss, InfoNCE, hardest-negative triplets, ...) needs every image paired with
every caption of the *global* batch. :func:`gather_tensor` concatenates a tensor over all
processes (in rank order) and is differentiable:

    forward:   y = concat_r(x_r)
    backward:  dL/dx_r = sum_over_processes_p (dL_p / dy)[slice of r]

Every process computes the same loss ``L`` on the same gathered tensors, so the backward sums
``W`` identical copies of ``dL/dx_r``; after DDP *averages* parameter gradients over the ``W``
processes the result is exactly the single-process gradient of ``L`` on the global batch, both
for the towers (reached through the local slice) and for parameters used only in the loss (the
match scale ``a`` and shift ``b``, reached on every process). This is the behaviour of
``torch.distributed.nn.functional.all_gather``; the open_clip alternative (gather without
gradient, put the local tensor back in its slot) instead leaves tower gradients ``W`` times
smaller than those of ``a`` and ``b``.

Unlike ``torch.distributed.nn.functional.all_gather`` the tensors may differ in size between
processes in every dimension: the batch dimension is concatenated without padding, trailing
dimensions are padded with zeros to the largest size (e.g. attention maps over captions padded to
different lengths; a zero attention weight on a padding position is what the heads produce
anyway). Works on every backend (gloo on CPU included); when ``torch.distributed`` is not
initialised or has one process, every function is the identity.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .outputs import ProbabilisticEmbedding


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _exchange_shapes(tensors: list[torch.Tensor]) -> list[list[torch.Size]]:
    """All processes' shapes of ``tensors``, one small all-gather: ``out[rank][i]`` is the shape of tensor ``i``."""
    ndims = [t.dim() for t in tensors]
    local = torch.tensor([size for t in tensors for size in t.shape], dtype=torch.long, device=tensors[0].device)
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, local)
    shapes = []
    for flat in everyone:
        sizes, start = [], 0
        for ndim in ndims:
            sizes.append(torch.Size(flat[start : start + ndim].tolist()))
            start += ndim
        shapes.append(sizes)
    return shapes


def _pad_to(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad ``tensor`` at the end of every dimension up to ``shape``."""
    padding: list[int] = []
    for have, want in zip(reversed(tensor.shape), reversed(shape)):
        padding += [0, want - have]
    if not any(padding):
        return tensor.contiguous()
    return F.pad(tensor, padding)


class _GatherWithGradient(torch.autograd.Function):
    """All-gather along dim 0; the backward sums every process's gradient of the local slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, shapes: list[torch.Size]) -> torch.Tensor:  # type: ignore[override]
        rank = dist.get_rank()
        padded_shape = tuple(max(s[d] for s in shapes) for d in range(tensor.dim()))
        buffers = [tensor.new_empty(padded_shape) for _ in shapes]
        dist.all_gather(buffers, _pad_to(tensor, padded_shape))
        ctx.shapes, ctx.rank, ctx.padded_shape = shapes, rank, padded_shape
        # The batch dimension is trimmed back to each process's size; trailing dims stay padded.
        return torch.cat([buf[: s[0]] for buf, s in zip(buffers, shapes)], dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        shapes, rank, padded_shape = ctx.shapes, ctx.rank, ctx.padded_shape
        pieces = torch.split(grad_output.contiguous(), [s[0] for s in shapes], dim=0)
        stacked = torch.stack([_pad_to(piece, padded_shape) for piece in pieces])
        if dist.get_backend() == dist.Backend.NCCL:
            local = stacked.new_empty(padded_shape)
            dist.reduce_scatter_tensor(local, stacked.flatten(0, 1))
        else:
            # gloo has no reduce-scatter: sum everything, keep our slice (W times the traffic, same result).
            dist.all_reduce(stacked)
            local = stacked[rank]
        own = shapes[rank]
        return local[tuple(slice(0, size) for size in own)], None


def _gather_with_shapes(tensor: torch.Tensor, shapes: list[torch.Size]) -> torch.Tensor:
    if tensor.requires_grad:
        return _GatherWithGradient.apply(tensor, shapes)
    with torch.no_grad():
        return _GatherWithGradient.forward(_NoContext(), tensor, shapes)


class _NoContext:
    """Stand-in for an autograd context when gathering tensors that need no gradient."""


def gather_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Concatenate ``tensor`` over all processes along dim 0 (rank order), differentiably.

    Args:
        tensor: ``(B_r, ...)`` on each process ``r``; every process must pass a tensor of the same
            number of dimensions and dtype (or ``None`` on every process). Sizes may differ.

    Returns:
        ``(sum_r B_r, ...)`` with trailing dimensions zero-padded to the largest size; the
        identity when not distributed. Gradients reach the local slice from every process's
        loss (see the module docstring for why this matches one process on the global batch).
    """
    if tensor is None or not is_distributed():
        return tensor
    shapes = _exchange_shapes([tensor])
    return _gather_with_shapes(tensor, [s[0] for s in shapes])


def gather_embeddings(embeddings: ProbabilisticEmbedding) -> ProbabilisticEmbedding:
    """Gather every tensor field of a :class:`ProbabilisticEmbedding` (mean, log_sigma2, samples, attention).

    Fields that are ``None`` stay ``None`` (they must be ``None`` on every process). One small
    all-gather exchanges the shapes of all fields, then one all-gather per field.
    """
    if not is_distributed():
        return embeddings
    names = [f.name for f in dataclasses.fields(embeddings) if isinstance(getattr(embeddings, f.name), torch.Tensor)]
    if not names:
        return embeddings
    tensors = [getattr(embeddings, name) for name in names]
    shapes = _exchange_shapes(tensors)
    gathered = {
        name: _gather_with_shapes(tensor, [per_rank[i] for per_rank in shapes])
        for i, (name, tensor) in enumerate(zip(names, tensors))
    }
    return ProbabilisticEmbedding(**{f.name: gathered.get(f.name) for f in dataclasses.fields(embeddings)})


__all__ = ["gather_embeddings", "gather_tensor", "is_distributed"]
