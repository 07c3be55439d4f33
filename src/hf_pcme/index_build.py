"""Making the search back end of a :class:`~hf_pcme.index.CrossModalIndex` from item search vectors.

:func:`build_search_backend` turns embeddings into a back end: the exact torch search, the exact
FAISS flat index, or an approximate FAISS index (``hf_pcme.index_ann``). Vectors are made and
added block by block, so the back end's own storage is the only full copy (IVF-PQ keeps the exact
vectors for re-scoring: that is its one full copy). :func:`read_faiss_backend` reads a saved one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .distances import iter_row_chunks
from .index_ann import ApproximateBackend, create_faiss_index
from .index_options import APPROXIMATE_INDEX_TYPES, AnnOptions, train_sample_size
from .index_backends import FaissBackend, SearchBackend, TorchBackend, require_faiss
from .scoring import SCORES, Score, as_embedding_rows

#: FAISS index types: the exact ``"flat"`` one and the approximate ones.
FAISS_INDEX_TYPES = ("flat", *APPROXIMATE_INDEX_TYPES)

VectorBlock = Callable[[Any], torch.Tensor]


def build_search_backend(
    mean: torch.Tensor,
    log_sigma2: torch.Tensor | None,
    score: Score,
    *,
    backend: str,
    index_type: str = "flat",
    nlist: int | None = None,
    nprobe: int = 16,
    options: AnnOptions | None = None,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    block_rows: int = 65536,
) -> tuple[SearchBackend, int | None]:
    """The back end of the items' search vectors, and the IVF ``nlist`` it used (else ``None``)."""
    if backend == "torch":
        mean = mean.to(device) if device is not None else mean
        vectors = score.item_vectors(mean, log_sigma2.to(mean.device) if log_sigma2 is not None else None)
        return TorchBackend(vectors, chunk_size), None
    require_faiss()
    mean = as_embedding_rows(mean.cpu(), "mean")

    def block(rows: Any) -> torch.Tensor:
        return score.item_vectors(mean[rows], log_sigma2[rows] if log_sigma2 is not None else None)

    shape = (mean.shape[0], mean.shape[1], mean.shape[2] + score.extra_dims)
    options = options or AnnOptions()
    return build_faiss_backend(block, shape, mean.shape[2], index_type, nlist, nprobe, options, block_rows)


def build_faiss_backend(
    block: VectorBlock,
    shape: tuple[int, int, int],
    embed_dim: int,
    index_type: str,
    nlist: int | None,
    nprobe: int,
    options: AnnOptions,
    block_rows: int = 65536,
    exact_vectors: torch.Tensor | None = None,
) -> tuple[SearchBackend, int | None]:
    """A FAISS back end filled with ``block(rows)`` (item vectors ``(n, K, D')``) for ``shape = (N, K, D')``.

    ``embed_dim``: D, the embedding size (D' minus the score's extra coordinates).

    ``exact_vectors``: the full ``(N, K, D')`` vectors if the caller already holds them (IVF-PQ
    then keeps them for re-scoring instead of a copy).
    """
    num_items, num_embeds, dim = shape
    if index_type == "flat":
        searcher: SearchBackend = FaissBackend(require_faiss().IndexFlatIP(dim), num_embeds)
        nlist = None
    else:
        num_rows = num_items * num_embeds
        faiss_index, nlist = create_faiss_index(index_type, dim, embed_dim, nlist, options, num_rows)
        searcher = ApproximateBackend(faiss_index, num_embeds, index_type, options, None, dim - embed_dim)
        sample_items = train_sample_size(index_type, nlist, options, num_items, num_embeds)
        if sample_items:  # k-means and PQ codebooks on a fixed random subset: fast and reproducible
            sample = torch.randperm(num_items, generator=torch.Generator().manual_seed(0))[:sample_items]
            searcher.train(block(sample.sort().values))
        searcher.set_nprobe(nprobe)
        searcher.set_ef_search(options.ef_search)
        if index_type == "ivf_pq" and exact_vectors is None:  # lossy codes: keep the exact vectors
            exact_vectors = torch.empty(shape)
            for rows in iter_row_chunks(num_items, block_rows):
                exact_vectors[rows] = block(rows)
        if exact_vectors is not None:
            block = exact_vectors.__getitem__
    for rows in iter_row_chunks(num_items, block_rows):
        searcher.add(block(rows))
    if index_type == "ivf_pq":
        searcher.exact = TorchBackend(exact_vectors)
    return searcher, nlist


def rebuild_as_faiss(
    source: SearchBackend,
    embed_dim: int,
    index_type: str,
    nlist: int | None,
    nprobe: int,
    options: AnnOptions,
    block_rows: int = 65536,
) -> tuple[SearchBackend, int | None]:
    """A FAISS back end of the vectors another back end stores, read block by block (no copy of the means).

    From a torch back end, IVF-PQ shares its exact vectors for re-scoring.
    """
    require_faiss()
    shape = (source.num_items, source.num_embeds, source.dim)
    exact = source.vectors.cpu() if isinstance(source, TorchBackend) else None

    def block(rows: Any) -> torch.Tensor:
        indices = torch.arange(source.num_items)[rows] if isinstance(rows, slice) else rows
        return source.reconstruct(indices).cpu()

    return build_faiss_backend(block, shape, embed_dim, index_type, nlist, nprobe, options, block_rows, exact)


def read_faiss_backend(
    path: Path, config: dict, exact_mean: torch.Tensor | None, log_sigma2: torch.Tensor | None
) -> SearchBackend:
    """The back end saved in ``path`` (``faiss.write_index``), checked against ``config``.

    IVF-PQ needs the exact means (``exact_mean``, saved next to the codes) for re-scoring.
    """
    index = require_faiss().read_index(str(path))
    num_embeds, metric, index_type = config["num_embeds"], config["metric"], config["faiss_index_type"]
    expected_rows = config["num_items"] * num_embeds
    expected_dim = config["embed_dim"] + SCORES[metric].extra_dims
    if index.ntotal != expected_rows or index.d != expected_dim:
        raise ValueError(
            f"{path.name} holds {index.ntotal} vectors of size {index.d}, but the index config says "
            f"{expected_rows} of size {expected_dim}: the files do not belong together."
        )
    if index_type == "flat":
        return FaissBackend(index, num_embeds)
    exact = None
    if index_type == "ivf_pq":
        if exact_mean is None:
            raise ValueError(f"An IVF-PQ index needs the exact means next to {path.name} (embeddings.safetensors).")
        exact = TorchBackend(SCORES[metric]().item_vectors(exact_mean, log_sigma2))
    options = AnnOptions.from_dict(config.get("ann"))
    searcher = ApproximateBackend(index, num_embeds, index_type, options, exact, SCORES[metric].extra_dims)
    searcher.set_nprobe(config["nprobe"])
    searcher.set_ef_search(searcher.options.ef_search)
    return searcher


__all__ = ["FAISS_INDEX_TYPES", "build_faiss_backend", "build_search_backend", "read_faiss_backend", "rebuild_as_faiss"]
