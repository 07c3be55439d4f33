"""A searchable corpus of embeddings for cross-modal retrieval: exact or approximate, torch or FAISS.

:class:`CrossModalIndex` holds the embeddings of a corpus (captions or images) and returns, for a
batch of queries, the ``top_k`` items by one of two metrics:

- ``"cosine"``: the cosine of the means (for K embeddings per item, PVSE's best pair:
  ``s(q, t) = max_{i, j} cos(q_i, t_j)``);
- ``"csd"``: PCME++'s closed-form sampled distance (Chun, ICLR 2024), smaller = better,
  ``d(v, t) = ||mu_v - mu_t||^2 + sum sigma_v^2 + sum sigma_t^2`` (a point embedding has sigma = 0).

Both reduce to one maximum-inner-product search (``hf_pcme.scoring``; docs/formulas.md, "CSD as
an inner product"): query ``q = [mu_v, 1]``, item ``k = [2 mu_t, -(|mu_t|^2 + sum sigma_t^2)]``,
``q . k - c(v) = -d(v, t)`` exactly. The same vectors serve every back end:

- ``backend="torch"`` (``index_backends``): exact, chunked matrix products, any device;
- ``backend="faiss"``, ``faiss_index_type="flat"`` (``index_backends``): exact, FAISS ``IndexFlatIP``;
- ``faiss_index_type="ivf"`` / ``"ivf_pq"`` / ``"hnsw"`` (``index_ann``): approximate candidates,
  re-scored exactly; options and how to choose them in ``index_options``.

Modules: building back ends ``index_build``, files ``index_io`` (JSON + safetensors +
``faiss.write_index``; nothing pickled), payload checks ``index_payload``, model identity
``index_identity``, corpus encoding ``encoding``. An index is immutable once built (only its
search options can change): a retriever swaps whole indexes (``set_index``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .encoding import encode_batch, encode_corpus, infer_modality, load_images  # noqa: F401  (re-exported)
from .index_identity import check_compatible, default_metric, model_fingerprint
from .index_options import AnnOptions, ApproximateSearchSettings
from .index_backends import QUERY_CHUNK_ROWS, SCORE_BLOCK_ELEMENTS, faiss  # noqa: F401  (re-exported)
from .index_backends import FaissBackend, SearchBackend, TorchBackend, require_faiss
from .index_build import FAISS_INDEX_TYPES, build_search_backend, rebuild_as_faiss
from .index_io import CONFIG_NAME, EMBEDDINGS_NAME, FAISS_NAME, FORMAT_VERSION, IDS_NAME  # noqa: F401
from .index_io import load_index, save_index
from .index_payload import MODALITIES, check_payload, check_query, item_uncertainty
from .outputs import ProbabilisticEmbedding
from .registry import check_choice
from .scoring import SCORES, SEARCH_SCORES
from .scoring import item_search_vectors, query_search_vectors  # noqa: F401  (old public names)

#: The scores an index searches exactly (``hf_pcme.scoring.SEARCH_SCORES``).
METRICS = SEARCH_SCORES
BACKENDS = ("torch", "faiss")

#: Items turned into search vectors at once while building (bounds the temporaries).
BUILD_CHUNK_ROWS = 65536


def _means_from_search_vectors(vectors: torch.Tensor, metric: str) -> torch.Tensor:
    return SCORES[metric]().means_from_item_vectors(vectors)


# ---------------------------------------------------------------------------- results
@dataclass
class SearchResult:
    """Top-k items per query, best first.

    Args:
        scores: ``(Q, k)`` float32; the cosine, or ``-d`` for CSD (higher = better).
        indices: ``(Q, k)`` int64 positions in the index (-1 where an approximate FAISS IVF
            search found fewer than k items; their score is ``-inf``).
        distances: ``(Q, k)`` CSD distances ``d = -scores`` for ``metric="csd"``, else ``None``.
    """

    scores: torch.Tensor
    indices: torch.Tensor
    distances: torch.Tensor | None = None


# ---------------------------------------------------------------------------- the index
class CrossModalIndex(ApproximateSearchSettings):
    """An immutable, searchable corpus of (probabilistic) embeddings.

    Build one with :meth:`from_embeddings` (tensors you already have), :meth:`build` (a model,
    its processor and a corpus of captions or images) or :meth:`load` (a saved index).

    Attributes:
        ids: one JSON-serialisable id (str or int) per item.
        texts: the captions of a text corpus (``None`` for images).
        modality: ``"text"`` or ``"image"``: what the items are.
        metric: ``"cosine"`` or ``"csd"``.
        backend: ``"torch"`` or ``"faiss"``.
        faiss_index_type: ``"flat"`` (exact) or an approximate type, ``"ivf"``, ``"ivf_pq"``, ``"hnsw"``.
        nlist: IVF cells (``None`` otherwise). nprobe / ef_search / candidate_factor: search
            options of the approximate types, settable at any time (``hf_pcme.index_ann``).
        ann_options: :class:`~hf_pcme.index_ann.AnnOptions` of the approximate types.
        embed_dim: D.  num_embeds: K embeddings per item (1 except for polysemous heads).
        log_sigma2: ``(N, D)`` item log variances or ``None``.
        uncertainty: ``(N,)`` mean over D of sigma^2 (``ProbabilisticEmbedding.uncertainty``) or ``None``.
        attention: ``(N, K, L)`` attention maps of the items' pooling head (image corpora) or ``None``.
        model_fingerprint: :func:`model_fingerprint` of the model that embedded the corpus, or ``None``.
    """

    def __init__(
        self,
        *,
        searcher: SearchBackend,
        embed_dim: int,
        log_sigma2: torch.Tensor | None,
        attention: torch.Tensor | None,
        ids: list,
        texts: list[str] | None,
        modality: str,
        metric: str,
        faiss_index_type: str,
        nlist: int | None,
        nprobe: int,
        model_fingerprint: str | None,
        ann_options: AnnOptions | None = None,
    ):
        # Use the constructors (from_embeddings, build, load); this one trusts its arguments.
        self._searcher = searcher  # the search vectors and the search (index_backends.py, index_ann.py)
        self.num_items = searcher.num_items
        self.embed_dim = embed_dim
        self.num_embeds = searcher.num_embeds
        self.log_sigma2 = log_sigma2
        self.attention = attention
        self.ids = ids
        self.texts = texts
        self.modality = modality
        self.metric = metric
        self.backend = searcher.name
        self.faiss_index_type = faiss_index_type
        self.nlist = nlist
        self.ann_options = getattr(searcher, "options", None) or ann_options or AnnOptions()
        self.nprobe = nprobe
        self.model_fingerprint = model_fingerprint
        self.uncertainty = item_uncertainty(log_sigma2, BUILD_CHUNK_ROWS)

    @property
    def chunk_size(self) -> int | None:
        """Items per block of the torch search (``None``: automatic, and for FAISS)."""
        return getattr(self._searcher, "chunk_size", None)

    @property
    def _faiss_index(self) -> Any:
        return getattr(self._searcher, "faiss_index", None)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_embeddings(
        cls,
        mean: torch.Tensor,
        log_sigma2: torch.Tensor | None = None,
        *,
        ids: Sequence[str | int] | None = None,
        texts: Sequence[str] | None = None,
        attention: torch.Tensor | None = None,
        modality: str = "text",
        metric: str = "cosine",
        backend: str = "torch",
        faiss_index_type: str = "flat",
        nlist: int | None = None,
        nprobe: int = 16,
        ann_options: AnnOptions | None = None,
        model_fingerprint: str | None = None,
        device: torch.device | str | None = None,
        chunk_size: int | None = None,
    ) -> "CrossModalIndex":
        """Index embeddings you already have.

        Args:
            mean: ``(N, D)`` means, or ``(N, K, D)`` for K embeddings per item (PVSE).
            log_sigma2: ``(N, D)`` log variances, or ``None`` for point embeddings.
            ids: one str / int per item (default ``0..N-1``).  texts: the captions of a text corpus.
            attention: ``(N, K, L)`` attention maps of the items, kept for display.
            modality: what the items are, ``"text"`` or ``"image"``.  metric: ``"cosine"`` or ``"csd"``.
            backend: ``"torch"`` (exact, chunked) or ``"faiss"``.
            faiss_index_type: ``"flat"`` (exact), or approximate with exact re-scoring of the
                candidates: ``"ivf"`` (IVF-Flat), ``"ivf_pq"`` (IVF-PQ), ``"hnsw"``
                (``hf_pcme.index_ann``: how to choose the options).
            nlist / nprobe: IVF cells (default ``4 sqrt(N)``) / cells scanned per query.
            ann_options: the other options of the approximate types (:class:`~hf_pcme.index_ann.AnnOptions`).
            model_fingerprint: :func:`model_fingerprint` of the model that made the embeddings.
            device: where the torch back end keeps its vectors (default: the device of ``mean``).
            chunk_size: items scored per block by the torch back end (default: automatic,
                bounded to 64 MiB of scores).
        """
        check_choice(metric, METRICS, "metric")
        check_choice(backend, BACKENDS, "backend")
        check_choice(faiss_index_type, FAISS_INDEX_TYPES, "faiss_index_type")
        log_sigma2, attention, ids, texts = check_payload(mean, log_sigma2, attention, ids, texts, modality)
        if backend == "faiss":
            require_faiss()
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}.")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}.")
        index_type = faiss_index_type if backend == "faiss" else "flat"
        score = SCORES[metric]()
        searcher, nlist = build_search_backend(
            mean.detach(), log_sigma2, score, backend=backend, index_type=index_type, nlist=nlist, nprobe=nprobe,
            options=ann_options, device=device, chunk_size=chunk_size, block_rows=BUILD_CHUNK_ROWS,
        )  # fmt: skip
        return cls(
            searcher=searcher, embed_dim=searcher.dim - score.extra_dims, log_sigma2=log_sigma2, attention=attention,
            ids=ids, texts=texts, modality=modality, metric=metric, faiss_index_type=index_type, nlist=nlist,
            nprobe=nprobe, model_fingerprint=model_fingerprint, ann_options=ann_options,
        )  # fmt: skip

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        processor: Callable[..., Any],
        corpus: Sequence[Any],
        modality: str | None = None,
        *,
        batch_size: int = 32,
        ids: Sequence[str | int] | None = None,
        metric: str | None = None,
        store_attention: bool = True,
        progress_bar: bool = True,
        **index_options: Any,
    ) -> "CrossModalIndex":
        """Embed a corpus with a model and index it.

        Args:
            model: a :class:`PCMEModel` (anything with ``get_text_features`` /
                ``get_image_features`` returning :class:`ProbabilisticEmbedding`).
            processor: a :class:`PCMEProcessor`, or the tokenizer (texts) / image processor
                (images) alone: called as ``processor(text=...)`` or ``processor(images=...)``.
            corpus: captions (str), or images (PIL images or local paths).
            modality: ``"text"`` or ``"image"``; default: images if every item is a PIL image or a
                ``pathlib.Path``, texts if every item is a str (so give ``"image"`` for paths as str).
            batch_size: items embedded per forward pass.
            ids: default: the paths of path images, else ``0..N-1``.
            metric: default :func:`default_metric` of the model.
            store_attention: keep the image items' attention maps (``(N, K, L)``) for display.
            index_options: ``backend``, ``faiss_index_type``, ``nlist``, ``nprobe``, ``ann_options``,
                ``device`` (default: the model's device), ``chunk_size``: as :meth:`from_embeddings`.
        """
        corpus = list(corpus)
        if not corpus:
            raise ValueError("The corpus is empty: give at least one caption or image to index.")
        modality = infer_modality(corpus, "corpus") if modality is None else modality
        check_choice(modality, MODALITIES, "modality")
        if ids is None and modality == "image" and all(isinstance(item, (str, Path)) for item in corpus):
            ids = [str(item) for item in corpus]
        keep_attention = store_attention and modality == "image"
        embeddings = encode_corpus(
            model, processor, corpus, modality, batch_size=batch_size, return_attention=keep_attention,
            progress_bar=progress_bar,
        )  # fmt: skip
        return cls.from_embeddings(
            embeddings.mean,
            embeddings.log_sigma2,
            ids=ids,
            texts=[str(t) for t in corpus] if modality == "text" else None,
            attention=embeddings.attention if keep_attention else None,
            modality=modality,
            metric=metric or default_metric(model),
            model_fingerprint=model_fingerprint(model),
            **index_options,
        )

    def with_faiss_index(
        self,
        faiss_index_type: str,
        *,
        nlist: int | None = None,
        nprobe: int = 16,
        ann_options: AnnOptions | None = None,
    ) -> "CrossModalIndex":
        """The same items (ids, payloads) in a FAISS index of ``faiss_index_type`` (see :meth:`from_embeddings`).

        Built block by block from this index's stored search vectors, without a copy of the means;
        an IVF-PQ index made from a torch index shares its exact vectors for re-scoring.
        """
        check_choice(faiss_index_type, FAISS_INDEX_TYPES, "faiss_index_type")
        searcher, nlist = rebuild_as_faiss(
            self._searcher, self.embed_dim, faiss_index_type, nlist, nprobe, ann_options or AnnOptions(),
            BUILD_CHUNK_ROWS,
        )
        return type(self)(
            searcher=searcher, embed_dim=self.embed_dim, log_sigma2=self.log_sigma2, attention=self.attention,
            ids=self.ids, texts=self.texts, modality=self.modality, metric=self.metric,
            faiss_index_type=faiss_index_type, nlist=nlist, nprobe=nprobe, model_fingerprint=self.model_fingerprint,
        )  # fmt: skip

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return self.num_items

    def __repr__(self) -> str:
        extra = f", faiss_index_type={self.faiss_index_type!r}" if self.backend == "faiss" else ""
        return (
            f"CrossModalIndex(num_items={self.num_items}, modality={self.modality!r}, metric={self.metric!r}, "
            f"backend={self.backend!r}{extra}, embed_dim={self.embed_dim}, num_embeds={self.num_embeds})"
        )

    @property
    def device(self) -> torch.device:
        """Where the torch back end searches (FAISS: always the CPU)."""
        return self._searcher.device

    @property
    def search_dim(self) -> int:
        """D' = D (cosine) or D + 1 (CSD): the size of the vectors actually searched."""
        return self.embed_dim + (SCORES[self.metric].extra_dims)

    def nbytes(self) -> int:
        """Bytes held by the searchable vectors (the FAISS codes, or the torch tensor), per index."""
        return self._searcher.nbytes()

    def item_embeddings(self, indices: torch.Tensor) -> ProbabilisticEmbedding:
        """The stored embeddings of some items: ``mean (n, D)`` or ``(n, K, D)``, ``log_sigma2 (n, D)`` or ``None``."""
        flat = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
        vectors = self._searcher.reconstruct(flat)
        mean = _means_from_search_vectors(vectors, self.metric)
        if self.num_embeds == 1:
            mean = mean.squeeze(1)
        log_sigma2 = self.log_sigma2[flat] if self.log_sigma2 is not None else None
        return ProbabilisticEmbedding(mean=mean, log_sigma2=log_sigma2)

    @property
    def mean(self) -> torch.Tensor:
        """All stored means, ``(N, D)`` or ``(N, K, D)`` (L2-normalised for the cosine metric)."""
        return self.item_embeddings(torch.arange(self.num_items)).mean

    def check_compatible(self, model_fingerprint: str | None = None, embed_dim: int | None = None) -> None:
        """Raise a ``ValueError`` if this index was built by another model or for another embedding size.

        A ``None`` argument (or an index without a fingerprint) is not checked.
        """
        check_compatible(self.model_fingerprint, self.embed_dim, model_fingerprint, embed_dim)

    def to(self, device: torch.device | str) -> "CrossModalIndex":
        """A copy of this index whose torch back end searches on ``device`` (FAISS indexes stay on the CPU)."""
        if not isinstance(self._searcher, TorchBackend):
            return self
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._searcher = self._searcher.to(device)
        return clone

    # ------------------------------------------------------------------ search
    def search(
        self, query_mean: torch.Tensor, query_log_sigma2: torch.Tensor | None = None, top_k: int = 5
    ) -> SearchResult:
        """The ``top_k`` items of each query, best first.

        Args:
            query_mean: ``(Q, D)`` or ``(Q, K, D)`` query means.
            query_log_sigma2: ``(Q, D)`` log variances (CSD; ``None`` = point queries).
            top_k: items per query, ``1 <= top_k <= len(self)``.
        Returns:
            :class:`SearchResult` on the CPU; for CSD, ``distances`` are exact CSDs (the approximate
            FAISS types re-score their candidates exactly).
        """
        check_query(query_mean, query_log_sigma2, top_k, self.num_items, self.embed_dim, self.metric, self.log_sigma2)
        device = self.device
        query_mean = query_mean.detach().to(device)
        if query_log_sigma2 is not None:
            query_log_sigma2 = query_log_sigma2.detach().to(device)
        # Full precision even inside autocast: a half-precision product would blur close scores.
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            query_vectors, offsets = SCORES[self.metric]().query_vectors(query_mean, query_log_sigma2)
            scores, indices = self._searcher.search(query_vectors, offsets, top_k)
        scores, indices = scores.cpu(), indices.cpu()
        distances = -scores if self.metric == "csd" else None
        return SearchResult(scores=scores, indices=indices, distances=distances)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index to ``directory`` (created if needed); returns the directory (``hf_pcme.index_io``)."""
        return save_index(self, Path(directory))

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        backend: str | None = None,
        device: torch.device | str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> "CrossModalIndex":
        """Read an index written by :meth:`save`.

        ``backend`` (default: the saved one) may differ from the saved back end: the vectors
        are then moved into the other one. ``device`` places the torch back end. ``nprobe`` and
        ``ef_search`` override the saved search options (they can also be set later).
        """
        return load_index(cls, Path(directory), backend=backend, device=device, nprobe=nprobe, ef_search=ef_search)


__all__ = [  # fmt: skip
    "AnnOptions", "CrossModalIndex", "SearchResult", "model_fingerprint", "default_metric", "item_search_vectors",
    "query_search_vectors", "require_faiss", "FaissBackend", "SearchBackend", "TorchBackend", "infer_modality",
    "load_images", "encode_batch", "encode_corpus"
]
