"""Search back ends of :class:`~hf_pcme.index.CrossModalIndex`: one small interface, as FAISS's ``Index``.

A back end holds the items' search vectors (``hf_pcme.scoring``: ``(N, K, D')``, K rows per item)
and answers maximum-inner-product queries:

- ``add(vectors)``: append items' search vectors ``(n, K, D')``;
- ``search(query_vectors, offsets, k)``: the ``k`` best items of each query, best first, with
  ``score = max_{k, k'} (q_k . v_k' - offset_k)`` (cosine, or ``-CSD`` exactly; the best of the
  K x K' pairs for several embeddings per item / query);
- ``reconstruct(indices)``: the stored vectors of some items, ``(n, K, D')`` float32.

:class:`TorchBackend` is exact, on any device, chunked so that memory stays flat in the corpus
size. :class:`FaissBackend` wraps FAISS's exact inner-product index (``IndexFlatIP``), CPU only
(``pip install hf_pcme[faiss]``); the approximate FAISS back ends (IVF-Flat, IVF-PQ, HNSW) are in
``hf_pcme.index_ann``. Ids, payloads and persistence stay in :class:`~hf_pcme.index.CrossModalIndex`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .distances import best_pair_scores, chunked_pairwise, iter_row_chunks

try:  # optional: the torch back end works without it (extra `hf_pcme[faiss]`)
    import faiss
except ImportError:  # pragma: no cover - exercised only where faiss is missing
    faiss = None

#: Upper bound on the elements of one (query rows x item rows) score block of the torch search
#: (64 MiB of float32): large enough for a fast matrix product, small enough for any device.
SCORE_BLOCK_ELEMENTS = 1 << 24
#: Query rows scored at once by the torch search.
QUERY_CHUNK_ROWS = 1024


def require_faiss() -> Any:
    """Return the ``faiss`` module, or raise an ``ImportError`` that says how to install it."""
    if faiss is None:
        raise ImportError(
            "The FAISS back end of CrossModalIndex needs the `faiss` package: `pip install hf_pcme[faiss]` "
            "(or `pip install faiss-cpu`). The exact torch back end (backend='torch') works without it."
        )
    return faiss


def _merge_topk(
    best: tuple[torch.Tensor, torch.Tensor] | None, scores: torch.Tensor, indices: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if best is not None:
        scores = torch.cat([best[0], scores], dim=1)
        indices = torch.cat([best[1], indices], dim=1)
    k = min(top_k, scores.shape[1])
    scores, order = scores.topk(k, dim=1)
    return scores, indices.gather(1, order)


class SearchBackend:
    """The interface (see the module docstring). ``num_items``, ``num_embeds`` (K), ``dim`` (D')."""

    name: str
    num_items: int
    num_embeds: int
    dim: int

    @property
    def device(self) -> torch.device:
        """Where queries are scored."""
        return torch.device("cpu")

    def add(self, vectors: torch.Tensor) -> None:
        """Append the search vectors ``(n, K, D')`` of ``n`` items."""
        raise NotImplementedError

    def search(self, query_vectors: torch.Tensor, offsets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores, indices)``, both ``(Q, k)``, best first, for ``(Q, K_q, D')`` queries and ``(Q, K_q)`` offsets."""
        raise NotImplementedError

    def reconstruct(self, indices: torch.Tensor) -> torch.Tensor:
        """The stored search vectors of items ``indices`` (1-D, CPU), ``(n, K, D')`` float32."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes held by the searchable vectors."""
        return self.num_items * self.num_embeds * self.dim * 4  # float32 codes of a flat / IVF-flat index


class TorchBackend(SearchBackend):
    """Exact search with matrix products, item chunk by item chunk (``chunk_size`` items; default: as
    many as fit in :data:`SCORE_BLOCK_ELEMENTS` scores) and :data:`QUERY_CHUNK_ROWS` queries at a time."""

    name = "torch"

    def __init__(self, vectors: torch.Tensor, chunk_size: int | None = None) -> None:
        self.vectors = vectors.contiguous()
        self.chunk_size = chunk_size

    num_items = property(lambda self: self.vectors.shape[0])
    num_embeds = property(lambda self: self.vectors.shape[1])
    dim = property(lambda self: self.vectors.shape[2])

    @property
    def device(self) -> torch.device:
        return self.vectors.device

    def to(self, device: torch.device | str) -> "TorchBackend":
        """A copy that searches on ``device``."""
        return TorchBackend(self.vectors.to(device), self.chunk_size)

    def add(self, vectors: torch.Tensor) -> None:
        self.vectors = torch.cat([self.vectors, vectors.to(self.vectors.device, torch.float32)]).contiguous()

    def nbytes(self) -> int:
        return self.vectors.numel() * self.vectors.element_size()

    def reconstruct(self, indices: torch.Tensor) -> torch.Tensor:
        return self.vectors[indices.to(self.vectors.device)].float()

    def search(self, query_vectors: torch.Tensor, offsets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        num_queries, query_embeds, dim = query_vectors.shape
        item_embeds = self.num_embeds
        all_scores, all_indices = [], []
        for query_rows in iter_row_chunks(num_queries, QUERY_CHUNK_ROWS):
            queries = query_vectors[query_rows].reshape(-1, dim)
            query_offsets = offsets[query_rows].reshape(-1, 1)
            chunk_queries = query_rows.stop - query_rows.start
            chunk_size = self.chunk_size or max(1, SCORE_BLOCK_ELEMENTS // (queries.shape[0] * item_embeds))

            def block_scores(items: torch.Tensor, queries: torch.Tensor, query_offsets: torch.Tensor) -> torch.Tensor:
                # score = q . k - c(q): cosine, or -CSD exactly; then the best of the K x K pairs.
                raw = torch.addmm(-query_offsets, queries, items.reshape(-1, dim).t())
                return best_pair_scores(raw, chunk_queries, query_embeds, item_embeds)

            best = None
            for item_rows, scores in chunked_pairwise(
                block_scores, (self.vectors,), (queries, query_offsets), chunk_size=chunk_size
            ):
                block_best, block_indices = scores.topk(min(k, scores.shape[1]), dim=1)
                best = _merge_topk(best, block_best, block_indices + item_rows.start, k)
            all_scores.append(best[0])
            all_indices.append(best[1])
        return torch.cat(all_scores), torch.cat(all_indices)


class FaissBackend(SearchBackend):
    """FAISS's exact inner-product index (``IndexFlatIP``) with one row per embedding (K rows per item).

    Wrap an empty ``IndexFlatIP``, then :meth:`add`; FAISS's storage is the only copy of the vectors.
    """

    name = "faiss"

    def __init__(self, faiss_index: Any, num_embeds: int) -> None:
        self.faiss_index = faiss_index
        self.num_embeds = num_embeds

    num_items = property(lambda self: self.faiss_index.ntotal // self.num_embeds)
    dim = property(lambda self: self.faiss_index.d)

    def write(self, path: Path) -> None:
        """``faiss.write_index`` (nothing pickled)."""
        require_faiss().write_index(self.faiss_index, str(path))

    def add(self, vectors: torch.Tensor) -> None:
        self.faiss_index.add(vectors.reshape(-1, self.dim).contiguous().numpy())

    def reconstruct(self, indices: torch.Tensor) -> torch.Tensor:
        rows = (indices.unsqueeze(1) * self.num_embeds + torch.arange(self.num_embeds)).reshape(-1)
        vectors = torch.from_numpy(self.faiss_index.reconstruct_batch(rows.numpy()))
        return vectors.view(indices.shape[0], self.num_embeds, -1)

    def reconstruct_all(self) -> torch.Tensor:
        """Every stored vector, ``(N, K, D')``."""
        rows = self.faiss_index.reconstruct_n(0, self.faiss_index.ntotal)
        return torch.from_numpy(rows).view(self.num_items, self.num_embeds, -1)

    def search(self, query_vectors: torch.Tensor, offsets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        num_queries, query_embeds, dim = query_vectors.shape
        item_embeds = self.num_embeds
        flat_queries = query_vectors.reshape(-1, dim).float().cpu().contiguous().numpy()
        flat_offsets = offsets.reshape(-1, 1).float().cpu()
        if query_embeds == 1 and item_embeds == 1:
            raw, rows = self.faiss_index.search(flat_queries, k)
            rows = torch.from_numpy(rows)
            scores = torch.from_numpy(raw) - flat_offsets
            return scores.masked_fill(rows < 0, -math.inf), rows
        # K embeddings per item / query: an item's score is its best pair. Each of the query's
        # embeddings finds its top k items within its top (k * K) rows (K rows per item), and
        # an item of the overall top k is in the per-embedding top k of the embedding that attains
        # its best pair; so re-scoring the union of those candidates exactly gives the exact top k.
        rows_per_query = min(k * item_embeds, self.num_items * item_embeds)
        _, rows = self.faiss_index.search(flat_queries, rows_per_query)
        candidates = torch.from_numpy(rows).view(num_queries, -1)
        all_scores = torch.full((num_queries, k), -math.inf)
        all_indices = torch.full((num_queries, k), -1, dtype=torch.long)
        for q in range(num_queries):
            items = torch.unique(candidates[q][candidates[q] >= 0] // item_embeds)
            vectors = self.reconstruct(items).reshape(-1, dim)
            query_offsets = flat_offsets.view(num_queries, query_embeds)[q, :, None]
            raw = query_vectors[q].float().cpu() @ vectors.t() - query_offsets
            scores = best_pair_scores(raw, 1, query_embeds, item_embeds).squeeze(0)
            top = min(k, items.numel())
            best, order = scores.topk(top)
            all_scores[q, :top] = best
            all_indices[q, :top] = items[order]
        return all_scores, all_indices


__all__ = [
    "FaissBackend",
    "SearchBackend",
    "TorchBackend",
    "require_faiss",
]
