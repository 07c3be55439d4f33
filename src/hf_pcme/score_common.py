"""The base of every score (:class:`Score`) and the input helpers scores share, as ``loss_common`` is for losses.

A score is one class in its own file (or in :mod:`hf_pcme.scoring`) subclassing :class:`Score`,
plus one line in :data:`hf_pcme.scoring.SCORES`. Model-side file: relative imports only.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch

from .distances import iter_row_chunks

#: Rows of search vectors filled at once (bounds the temporaries of the augmentation).
SEARCH_VECTOR_CHUNK_ROWS = 65536


def mean_and_log_sigma2(embeds: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(mean, log_sigma2)`` of a :class:`~hf_pcme.outputs.ProbabilisticEmbedding`; a tensor is a mean with no variance."""
    # Duck-typed, not isinstance: remote code may load ProbabilisticEmbedding from another module copy.
    if isinstance(embeds, torch.Tensor):
        return embeds, None
    return embeds.mean, embeds.log_sigma2


def as_embedding_rows(mean: torch.Tensor, name: str) -> torch.Tensor:
    """``(N, D)`` or ``(N, K, D)`` -> float32 ``(N, K, D)``."""
    if mean.dim() == 2:
        mean = mean.unsqueeze(1)
    if mean.dim() != 3:
        raise ValueError(f"{name} must be (N, D) or (N, K, D) (K embeddings per item), got {tuple(mean.shape)}.")
    return mean.float()


class Score:
    """One way to rank pairs. Subclasses set ``name`` and implement :meth:`pairwise`."""

    name: ClassVar[str]
    #: True when the score is exactly an inner product of :meth:`item_vectors` and :meth:`query_vectors`.
    searchable: ClassVar[bool] = False
    #: True when the score needs log variances (``log_sigma2``).
    needs_variance: ClassVar[bool] = False
    #: Extra dimensions of an item vector over the embedding size D.
    extra_dims: ClassVar[int] = 0

    def pairwise(self, image_embeds: Any, text_embeds: Any) -> torch.Tensor:
        """Scores ``(N, M)`` of N images against M captions, higher = better.

        Embeds: a :class:`~hf_pcme.outputs.ProbabilisticEmbedding` or a tensor of means.
        """
        raise NotImplementedError

    # -- inner-product search (searchable scores only)
    def _item_block(self, mean: torch.Tensor, log_sigma2: torch.Tensor | None) -> torch.Tensor:
        raise ValueError(f"score {self.name!r} is not an inner product; it has no search vectors.")

    def item_vectors(self, mean: torch.Tensor, log_sigma2: torch.Tensor | None = None) -> torch.Tensor:
        """Item side of the inner-product search, float32 ``(N, K, D + extra_dims)``.

        Filled block by block, so the only large allocation is the result (no N x D temporaries).
        """
        mean = as_embedding_rows(mean, "mean")
        out = torch.empty(*mean.shape[:2], mean.shape[-1] + self.extra_dims, dtype=torch.float32, device=mean.device)
        for rows in iter_row_chunks(mean.shape[0], SEARCH_VECTOR_CHUNK_ROWS):
            out[rows] = self._item_block(mean[rows], log_sigma2[rows] if log_sigma2 is not None else None)
        return out

    def query_vectors(
        self, mean: torch.Tensor, log_sigma2: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query side: vectors ``(Q, K, D + extra_dims)`` and offsets ``(Q, K)``, ``score = q . k - offset``."""
        raise ValueError(f"score {self.name!r} is not an inner product; it has no search vectors.")

    def pair_vectors(
        self, mean: torch.Tensor, log_sigma2: torch.Tensor | None, side: Literal["left", "right"]
    ) -> torch.Tensor:
        """Float32 ``(N, K, D')`` vectors with ``left(v) . right(t) = score(v, t)``, no offset.

        Derived from the one encoding: ``left = [item, 1]``, ``right = [query, -offset]``; with no
        extra dimensions (cosine) both sides are the item vectors. Serves both directions
        (``left @ right.T`` and its transpose). Filled in row blocks.
        """
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}.")
        mean = as_embedding_rows(mean, "mean")
        if self.extra_dims == 0:
            return self.item_vectors(mean, log_sigma2)
        out = torch.empty(
            *mean.shape[:2], mean.shape[-1] + self.extra_dims + 1, dtype=torch.float32, device=mean.device
        )
        for rows in iter_row_chunks(mean.shape[0], SEARCH_VECTOR_CHUNK_ROWS):
            block_log_sigma2 = log_sigma2[rows] if log_sigma2 is not None else None
            if side == "left":
                out[rows, :, :-1] = self._item_block(mean[rows], block_log_sigma2)
                out[rows, :, -1] = 1.0
            else:
                vectors, offsets = self.query_vectors(mean[rows], block_log_sigma2)
                out[rows, :, :-1] = vectors
                out[rows, :, -1] = -offsets
        return out

    def means_from_item_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """The means back from :meth:`item_vectors` (exact where the encoding keeps them)."""
        return vectors


__all__ = ["SEARCH_VECTOR_CHUNK_ROWS", "Score", "as_embedding_rows", "mean_and_log_sigma2"]
