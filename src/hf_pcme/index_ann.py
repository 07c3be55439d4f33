"""Approximate search back ends of :class:`~hf_pcme.index.CrossModalIndex`: FAISS IVF-Flat, IVF-PQ, HNSW.

Each one is built from the same search vectors as the exact search (``hf_pcme.scoring``: for
CSD, items ``[2 mu, -c]``, queries ``[mu, 1]``, ``q . k - c_q = -CSD`` exactly), so what it
approximates is exact CSD (or cosine) search, not some other score. FAISS holds them as points of
an L2 space that ranks exactly like the score (:func:`l2_item_points`: for CSD, items
``[mu, sqrt(sum sigma^2)]`` and queries ``[mu, 0]``, ``CSD = |y - x|^2 + sum sigma_v^2``), because
k-means cells and HNSW graphs need item-to-item distances that mean something; the two encodings
convert exactly into each other. A query asks the FAISS index
for ``k' = candidate_factor * k`` candidate items, re-scores them exactly (the full float32 item
vectors, ``score = q . k - offset``: the index's real score, with the best of K x K' pairs for
several embeddings per item) and returns the best ``k``. So scores are always exact; only the
*set* of candidates is approximate, and ``recall@k`` against exact search is what the options buy.

``faiss_index_type``:

- ``"ivf"`` (IVF-Flat): k-means puts the items in ``nlist`` cells; a query scans the ``nprobe``
  cells with the nearest centroids. Stores the full vectors (re-scoring reads them back).
- ``"ivf_pq"`` (IVF-PQ): the same cells, but each vector is a product-quantised code of
  ``pq_m`` bytes (``pq_bits`` bits per sub-quantiser; ``pq_m`` must divide D). CSD's extra
  coordinate gets a sub-quantiser of its own (the points are zero-padded by D / pq_m columns,
  which changes no distance), so codes have ``pq_m + 1`` sub-quantisers. The codes are lossy:
  the exact vectors are kept next to them for re-scoring (and saved as ``mean``).
- ``"hnsw"`` (HNSW-Flat): a graph with ``hnsw_m`` links per node, built with
  ``ef_construction`` and searched with a beam of ``ef_search`` (at least ``k'``). No training.

How to choose the options: ``hf_pcme.index_options``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .index_backends import QUERY_CHUNK_ROWS, SearchBackend, TorchBackend, require_faiss
from .index_options import APPROXIMATE_INDEX_TYPES, AnnOptions, check_nlist  # noqa: F401  (re-exported)

def create_faiss_index(
    index_type: str, dim: int, embed_dim: int, nlist: int | None, options: AnnOptions, num_rows: int
) -> tuple[Any, int | None]:
    """An empty (untrained) FAISS L2 index of ``dim``-d points (:func:`l2_item_points`), and its ``nlist``."""
    faiss = require_faiss()
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, options.hnsw_m)
        index.hnsw.efConstruction = options.ef_construction
        return index, None
    nlist = check_nlist(nlist, num_rows)
    if index_type == "ivf":
        return faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist), nlist
    pq_m = options.resolved_pq_m(embed_dim)
    if 2**options.pq_bits > num_rows:
        raise ValueError(
            f"pq_bits={options.pq_bits} means {2 ** options.pq_bits} centroids per sub-quantiser, more than the "
            f"{num_rows} vectors to train them on: use pq_bits <= {int(math.log2(num_rows))}."
        )
    sub_dim = embed_dim // pq_m
    padded = math.ceil(dim / sub_dim) * sub_dim  # CSD's extra coordinate gets a sub-quantiser of its own
    ivf_pq = faiss.IndexIVFPQ(faiss.IndexFlatL2(padded), padded, nlist, padded // sub_dim, options.pq_bits)
    ivf_pq.pq.cp.max_points_per_centroid = options.train_points_per_cell  # the codebooks' k-means sample too
    if padded == dim:
        return ivf_pq, nlist
    # faiss's Python wrapper keeps the transform and the IVF-PQ index alive as long as this one.
    return faiss.IndexPreTransform(faiss.RemapDimensionsTransform(dim, padded, False), ivf_pq), nlist


def l2_item_points(vectors: torch.Tensor, extra_dims: int) -> torch.Tensor:
    """Item search vectors -> points whose squared L2 distance to :func:`l2_query_points` ranks like the score.

    CSD (``extra_dims = 1``): item ``[2 mu, -c]`` -> ``[mu, sqrt(c - |mu|^2)] = [mu, sqrt(sum sigma^2)]``,
    query ``[mu_v, 1]`` -> ``[mu_v, 0]``: ``|y - x|^2 = |mu_v - mu_t|^2 + sum sigma_t^2 = CSD - sum sigma_v^2``.
    Cosine: unit vectors, ``|y - x|^2 = 2 - 2 cos``. Unlike the inner-product vectors (items and
    queries encoded differently), these points make item-to-item distances meaningful, which
    k-means cells and HNSW graphs rely on.
    """
    if extra_dims == 0:
        return vectors
    mean = vectors[..., :-1] * 0.5
    spread = (-vectors[..., -1] - mean.pow(2).sum(-1)).clamp(min=0).sqrt()
    return torch.cat([mean, spread.unsqueeze(-1)], dim=-1)


def item_vectors_from_points(points: torch.Tensor, extra_dims: int) -> torch.Tensor:
    """The inverse of :func:`l2_item_points` (the means exactly; ``c`` to float32 rounding)."""
    if extra_dims == 0:
        return points
    mean = points[..., :-1]
    return torch.cat([2.0 * mean, -(mean.pow(2).sum(-1) + points[..., -1].pow(2)).unsqueeze(-1)], dim=-1)


def l2_query_points(query_vectors: torch.Tensor, extra_dims: int) -> torch.Tensor:
    """Query search vectors -> points (see :func:`l2_item_points`)."""
    if extra_dims == 0:
        return query_vectors
    return torch.cat([query_vectors[..., :-1], torch.zeros_like(query_vectors[..., -1:])], dim=-1)


class ApproximateBackend(SearchBackend):
    """A FAISS approximate index for candidates + exact re-scoring (see the module docstring).

    ``exact``: a :class:`TorchBackend` of the exact vectors when the FAISS codes are lossy
    (IVF-PQ); ``None`` when FAISS stores the vectors themselves (IVF-Flat, HNSW-Flat).
    """

    name = "faiss"

    def __init__(
        self,
        faiss_index: Any,
        num_embeds: int,
        index_type: str,
        options: AnnOptions,
        exact: TorchBackend | None,
        extra_dims: int,
    ) -> None:
        self.faiss_index = faiss_index
        self.num_embeds = num_embeds
        self.extra_dims = extra_dims
        # L2 points (:func:`l2_item_points`); indexes saved before them hold the inner-product vectors.
        self.l2 = faiss_index.metric_type == require_faiss().METRIC_L2
        self.index_type = index_type
        self.options = options
        self.exact = exact
        if index_type == "ivf":
            require_faiss().extract_index_ivf(faiss_index).make_direct_map()  # reconstruct by position

    num_items = property(lambda self: self.faiss_index.ntotal // self.num_embeds)
    dim = property(lambda self: self.faiss_index.d)

    def set_nprobe(self, nprobe: int) -> None:
        """Cells an IVF index scans per query (no effect on HNSW)."""
        if self.index_type != "hnsw":
            require_faiss().extract_index_ivf(self.faiss_index).nprobe = nprobe

    def set_ef_search(self, ef_search: int) -> None:
        """The HNSW search beam (no effect on IVF)."""
        if self.index_type == "hnsw":
            require_faiss().downcast_index(self.faiss_index).hnsw.efSearch = ef_search

    def _faiss_rows(self, vectors: torch.Tensor, items: bool) -> Any:
        if self.l2:
            vectors = l2_item_points(vectors, self.extra_dims) if items else l2_query_points(vectors, self.extra_dims)
        return vectors.reshape(-1, self.dim).contiguous().numpy()

    def train(self, vectors: torch.Tensor) -> None:
        """Train the IVF cells (k-means) and PQ codebooks on sample item vectors ``(n, K, D')``; HNSW needs none."""
        if not self.faiss_index.is_trained:
            self.faiss_index.train(self._faiss_rows(vectors, items=True))

    def add(self, vectors: torch.Tensor) -> None:
        self.faiss_index.add(self._faiss_rows(vectors, items=True))
        if self.exact is not None:
            self.exact.add(vectors)

    def nbytes(self) -> int:
        if self.exact is None:
            return super().nbytes()
        codes = require_faiss().extract_index_ivf(self.faiss_index).code_size * self.faiss_index.ntotal
        return codes + self.exact.nbytes()

    def reconstruct(self, indices: torch.Tensor) -> torch.Tensor:
        if self.exact is not None:
            return self.exact.reconstruct(indices)
        rows = (indices.unsqueeze(1) * self.num_embeds + torch.arange(self.num_embeds)).reshape(-1)
        vectors = torch.from_numpy(self.faiss_index.reconstruct_batch(rows.numpy()))
        vectors = item_vectors_from_points(vectors, self.extra_dims) if self.l2 else vectors
        return vectors.view(indices.shape[0], self.num_embeds, -1)

    def reconstruct_all(self) -> torch.Tensor:
        """Every stored exact vector, ``(N, K, D')``."""
        return self.reconstruct(torch.arange(self.num_items))

    def write(self, path: Any) -> None:
        """``faiss.write_index`` of the FAISS index (nothing pickled; IVF-PQ's exact vectors are saved apart)."""
        require_faiss().write_index(self.faiss_index, str(path))

    def search(self, query_vectors: torch.Tensor, offsets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        query_vectors, offsets = query_vectors.float().cpu(), offsets.float().cpu()
        results = [self._search_block(query_vectors[rows], offsets[rows], k) for rows in _row_slices(query_vectors)]
        return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])

    def _search_block(self, queries: torch.Tensor, offsets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        num_queries, query_embeds, dim = queries.shape
        num_candidates = min(self.options.candidate_factor * k, self.num_items)
        if self.index_type == "hnsw":  # the beam must hold every candidate row
            self.set_ef_search(max(self.options.ef_search, num_candidates * self.num_embeds))
        _, rows = self.faiss_index.search(self._faiss_rows(queries, items=False), num_candidates * self.num_embeds)
        rows = torch.from_numpy(rows).view(num_queries, -1)
        items = _unique_items(rows, self.num_embeds)
        scores = self._exact_scores(queries, offsets, items).masked_fill(items < 0, -math.inf)
        top = min(k, scores.shape[1])
        best, order = scores.topk(top, dim=1)
        found = items.gather(1, order).masked_fill(best == -math.inf, -1)
        if top < k:  # fewer candidates than asked (a tiny index): pad as FAISS does
            best = torch.cat([best, best.new_full((num_queries, k - top), -math.inf)], dim=1)
            found = torch.cat([found, found.new_full((num_queries, k - top), -1)], dim=1)
        return best, found


    def _exact_scores(self, queries: torch.Tensor, offsets: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``(Q, C)`` exact scores ``q . k - offset`` of each query's candidate items (best of the K x K' pairs)."""
        num_queries, num_candidates = items.shape
        flat = items.clamp(min=0).reshape(-1)
        if self.exact is not None or not self.l2:
            vectors = self.reconstruct(flat).view(num_queries, num_candidates, self.num_embeds, -1)
            scores = torch.einsum("qad,qcbd->qcab", queries, vectors)
        else:  # straight from the L2 points x = [mu, sqrt(s)]: q . k = 2 mu_v . mu - |x|^2 (no conversion pass)
            rows = (flat.unsqueeze(1) * self.num_embeds + torch.arange(self.num_embeds)).reshape(-1)
            points = torch.from_numpy(self.faiss_index.reconstruct_batch(rows.numpy()))
            points = points.view(num_queries, num_candidates, self.num_embeds, -1)
            if self.extra_dims == 0:
                scores = torch.einsum("qad,qcbd->qcab", queries, points)
            else:
                dots = torch.einsum("qad,qcbd->qcab", l2_query_points(queries, self.extra_dims), points)
                scores = 2.0 * dots - torch.einsum("qcbd,qcbd->qcb", points, points).unsqueeze(2)
        return (scores - offsets[:, None, :, None]).amax(dim=(2, 3))


def _row_slices(query_vectors: torch.Tensor) -> list[slice]:
    return [slice(s, s + QUERY_CHUNK_ROWS) for s in range(0, query_vectors.shape[0], QUERY_CHUNK_ROWS)]


def _unique_items(rows: torch.Tensor, num_embeds: int) -> torch.Tensor:
    """FAISS rows ``(Q, R)`` -> item indices ``(Q, R)``, each item once per query, -1 elsewhere."""
    items = torch.where(rows >= 0, rows // num_embeds, torch.full_like(rows, -1))
    if num_embeds == 1:
        return items
    items = items.sort(dim=1).values
    repeated = torch.zeros_like(items, dtype=torch.bool)
    repeated[:, 1:] = items[:, 1:] == items[:, :-1]
    return items.masked_fill(repeated, -1)


__all__ = [
    "APPROXIMATE_INDEX_TYPES",
    "AnnOptions",
    "ApproximateBackend",
    "create_faiss_index",
    "item_vectors_from_points",
    "l2_item_points",
    "l2_query_points",
]
