"""Cross-modal retrieval metrics: Recall@K, RSUM, R-Precision, MAP@R and PMRP, both directions.

:func:`evaluate_retrieval` is the one entry point (trainer, scripts, the ``evaluate`` module). It
takes the score matrix in row blocks, with the images as queries (i2t) and with the captions as
queries (t2i), and computes every metric from each block in one pass
(:func:`hf_pcme.metrics.ranking.rank_block`), so no row is ever sorted. The matrix is computed
once and held when it fits ``max_memory`` (default 1 GiB; COCO 5K takes 500 MB), else once per
direction and never held (:mod:`hf_pcme.metrics.schedule`); the results are the same.

The parts: :mod:`~hf_pcme.metrics.layout` (caption order, folds), :mod:`~hf_pcme.metrics.relevance`
and :mod:`~hf_pcme.metrics.positives` (relevant items), :mod:`~hf_pcme.metrics.plausibility`
(PMRP), :mod:`~hf_pcme.metrics.options` (the protocol options), :mod:`~hf_pcme.metrics.accumulate`
(means), and the plain definitions every fast path is tested against,
:mod:`~hf_pcme.metrics.definitions`.

Semantics (every value is a percentage, averaged over the queries that have at least one
relevant item):

- i2t: a query is an image; its *pairs* are its captions (``text_to_image == i``).
  t2i: a query is a caption; its pair is its image.
- Recall@K (K in ``ks``): 1 if a pair of the query is among the top K. ``rsum`` = the sum of
  the Recall@K of both directions.
- R-Precision and MAP@R (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020) against
  the *positives* of each query, ``R`` = number of positives:
  R-Precision = |top-R ∩ positives| / R, MAP@R = (1/R) sum_{i=1..R} P(i) rel(i).
  Positives are the pairs by default, the items of the same class when ``image_classes`` is
  given (PCME's CUB protocol), or explicit sets (e.g. ECCV Caption's human-verified positives).
  With positives other than the pairs, Recall@K against them is reported too
  (``i2t_positives_R@1``).
- PMRP (Chun et al., CVPR 2021): an item is plausible for a query if the multi-hot instance
  labels of their images differ in at most zeta positions (a caption has its image's labels).
  Items and queries whose image has no label are left out (from the ranking and from the
  queries). PMRP_zeta = |top-R ∩ plausible| / R with R = number of plausible items;
  ``*_pmrp`` is the mean over ``zetas``. With ``image_classes``, plausible = same class; with
  ``plausibility``, plausible = that matrix or function (e.g. the shapes data set).
- Ties: among items with equal scores, the items that are not relevant for the metric come
  first ("pessimistic"), for every metric; deterministic and independent of the item order.
- ``protocol="coco"``: also the 1K protocol, keys prefixed ``1k/``: the images in folds of
  ``fold_size`` (fold f = images ``[f * fold_size, (f + 1) * fold_size)`` and their captions),
  every metric computed inside each fold and averaged over the folds (PMRP included, as published;
  a fold where no query has a relevant item is left out of that metric's average).
  The unprefixed keys are always the whole set (5K for COCO); no ``5k/`` aliases are added.
- ``protocol="eccv_caption"`` / ``"cxc"``: the COCO keys plus ECCV Caption's mAP@R, R-Precision
  and R@1 and / or CxC's R@K, from the positives shipped by the ``eccv_caption`` package
  (:mod:`hf_pcme.metrics.eccv_caption`; needs ``image_ids`` / ``text_ids``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .accumulate import Means, accumulate, collect, record_per_query
from .layout import DIRECTIONS, Layout, check_fold_size, check_text_to_image, coco_folds, index_vector
from .options import DEFAULT_MAX_MEMORY, PROTOCOLS, RetrievalOptions
from .plausibility import MAX_ZETA, Plausibility, build_plausibility
from .positives import ExplicitPositives, build_positives
from .rank_types import Workspace
from .ranking import rank_block
from .relevance import Relevance
from .schedule import Task, plan_tasks, run_tasks, score_path
from .scorers import MatrixScores, ScoreSource, build_scorer

logger = logging.getLogger(__name__)

# The sizes below are read at each call (tests change them to exercise several chunks and pieces).
#: Scores per block produced by the scorer on GPU (128 MiB of float32): large enough for a fast matrix product.
BLOCK_ELEMENTS = 1 << 25
#: Scores per chunk on CPU (at most 64 MiB of float32 per worker): a product on one thread near the
#: BLAS peak (each product packs the whole item matrix, so chunks of fewer rows lose up to 10 %).
CPU_CHUNK_ELEMENTS = 1 << 24
#: Default worker threads on CPU (each holds one chunk).
MAX_CPU_WORKERS = 8
#: Scores per block given to the ranking passes (8 MiB of float32): stays in the CPU cache.
SUB_BLOCK_ELEMENTS = 1 << 21
#: Up to this many images, the PMRP levels of every image pair are computed once (int8, 64 MiB at most).
LEVEL_TABLE_IMAGES = 8192

__all__ = [
    "DIRECTIONS", "LEVEL_TABLE_IMAGES", "MAX_ZETA", "PROTOCOLS", "RetrievalOptions", "coco_folds", "evaluate_retrieval",
    "score_source",
]  # fmt: skip


# ---------------------------------------------------------------------------- entry point
def evaluate_retrieval(
    *,
    text_to_image: Any,
    scores: Any = None,
    image_embeds: Any = None,
    text_embeds: Any = None,
    image_log_sigma2: Any = None,
    text_log_sigma2: Any = None,
    image_samples: Any = None,
    text_samples: Any = None,
    scorer: str = "cosine",
    image_labels: Any = None,
    image_classes: Any = None,
    plausibility: Any = None,
    positives: Any = None,
    unranked_positives: Mapping[str, Any] | None = None,
    image_ids: Sequence[Any] | None = None,
    text_ids: Sequence[Any] | None = None,
    protocol: str | None = None,
    fold_size: int = 1000,
    zetas: Sequence[int] = (0, 1, 2),
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | None = None,
    num_samples: int = 7,
    negative_scale: Any = None,
    shift: Any = None,
    seed: int = 0,
    num_workers: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    options: RetrievalOptions | None = None,
    per_query: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """All retrieval metrics of a test set, both directions, in percent (see the module docstring).

    Args:
        text_to_image: ``(num_texts,)`` image index (row) of each caption.
        scores: ``(num_images, num_texts)`` scores, higher = better; or give embeddings.
        image_embeds, text_embeds: ``(N, D)`` means (``(N, K, D)`` for ``scorer="polysemous"``).
        image_log_sigma2, text_log_sigma2: ``(N, D)`` log variances (``"csd"``, ``"sampled"``).
        image_samples, text_samples: ``(N, J, D)`` samples for ``"sampled"`` (else drawn, ``num_samples``
            per item, seeded by ``seed``).
        scorer: ``"cosine"``, ``"csd"``, ``"sampled"`` or ``"polysemous"`` (``hf_pcme.metrics.SCORERS``).
        image_labels: ``(num_images, C)`` multi-hot instance labels -> PMRP per zeta in ``zetas``.
        image_classes: ``(num_images,)`` class ids (``-1`` = unknown) -> PMRP by class, and the
            default positives of R-Precision / MAP@R become the same-class items.
        plausibility: ``(num_images, num_texts)`` bool matrix, or ``callable(image_idx, text_idx)``
            returning that block (caption indices in the caller's order) -> PMRP.
        positives: ``"pairs"``, ``"classes"``, a ``(num_images, num_texts)`` bool matrix, or
            ``{"i2t": ..., "t2i": ...}`` with, per query, a sequence of item indices, or a mapping
            query id -> item ids resolved with ``image_ids`` / ``text_ids`` (a missing direction
            uses the pairs; queries without positives are skipped).
        unranked_positives: with a dict of ``positives``, ``{"i2t": ..., "t2i": ...}`` holding per
            query (caller's order) the number of further positives that are not among the ranked
            items: they count in ``R`` of R-Precision / MAP@R but are never retrieved (ECCV
            Caption's verified captions outside the 25K test captions, as ``eccv_caption`` counts them).
        protocol: ``None``, ``"coco"`` (adds the ``1k/`` keys), ``"eccv_caption"`` or ``"cxc"``
            (:func:`hf_pcme.metrics.eccv_caption.evaluate_eccv_caption`; other keywords go there).
        fold_size: images per fold of the 1K protocol (1000 for COCO).
        zetas: Hamming thresholds of PMRP.  ks: the K of Recall@K.
        chunk_size: query rows per score block (default: ~16M scores, 64 MiB, per chunk on CPU; ~32M on GPU).
        num_samples, negative_scale, shift, seed: for ``scorer="sampled"``.
        num_workers: threads that score and rank chunks of rows, each on one CPU thread (default:
            torch's thread count, at most 8, on CPU; 1 on GPU).
        max_memory: bytes the held ``(num_images, num_texts)`` float32 score matrix may take
            (default 1 GiB): within it the scores are computed once for both directions, past it
            once per direction (:mod:`hf_pcme.metrics.schedule`); same results. ``0`` never holds it.
        options: the protocol options as one :class:`~hf_pcme.metrics.options.RetrievalOptions`
            (``protocol``, ``fold_size``, ``zetas``, ``ks``, ``chunk_size``, ``num_workers``,
            ``max_memory``), instead of those keywords.
        per_query: a dict to fill with every query's values over the whole set (no ``1k/`` keys),
            the same names as the returned means (``i2t_R@1``, ``t2i_r_precision``,
            ``i2t_pmrp_zeta0``, ``t2i_pmrp`` = mean over ``zetas``, ...), each a float64 array of
            ``(num_images,)`` (i2t) or ``(num_texts,)`` (t2i) in the caller's order, as fractions
            in [0, 1] (not percent), NaN where the query is not scored (no relevant item). The mean
            of the non-NaN entries, times 100, is the returned value (PMRP: per zeta).

    Returns:
        A flat dict of floats in percent: ``i2t_R@1``, ..., ``rsum``, ``i2t_r_precision``,
        ``i2t_map_at_r``, ``i2t_pmrp``, ``i2t_pmrp_zeta0``, ... and with ``protocol="coco"`` the
        same names prefixed ``1k/``.
    """
    # Long only by its documented keyword signature (one keyword per option, kept for the many
    # callers); the work is in _RelevanceSources, _evaluate and hf_pcme.metrics.schedule.
    options = _options(options, protocol=protocol, fold_size=fold_size, zetas=zetas, ks=ks, chunk_size=chunk_size,
                       num_workers=num_workers, max_memory=max_memory)  # fmt: skip
    if options.protocol in ("eccv_caption", "cxc"):
        from .eccv_caption import evaluate_eccv_caption  # it calls back here with the positives

        if positives is not None or unranked_positives is not None:
            raise ValueError(f"protocol={options.protocol!r} brings its own positives; do not pass positives too.")
        return evaluate_eccv_caption(
            text_to_image=text_to_image, scores=scores, image_embeds=image_embeds, text_embeds=text_embeds,
            image_log_sigma2=image_log_sigma2, text_log_sigma2=text_log_sigma2, image_samples=image_samples,
            text_samples=text_samples, scorer=scorer, image_labels=image_labels, image_classes=image_classes,
            plausibility=plausibility, image_ids=image_ids, text_ids=text_ids, num_samples=num_samples,
            negative_scale=negative_scale, shift=shift, seed=seed, **dataclasses.asdict(options),
        )  # fmt: skip
    source = score_source(
        scores, scorer, image_embeds, text_embeds, image_log_sigma2, text_log_sigma2,
        image_samples, text_samples, num_samples, negative_scale, shift, seed,
    )  # fmt: skip
    if isinstance(scores, torch.Tensor) and scores.is_floating_point() and not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or infinite values; replace masked scores by a finite very low value.")
    sources = _RelevanceSources.build(
        source, options, text_to_image, image_labels, image_classes, plausibility, positives, unranked_positives,
        image_ids, text_ids,
    )  # fmt: skip
    return _evaluate(source, sources, options, per_query)


def _options(options: RetrievalOptions | None, **keywords: Any) -> RetrievalOptions:
    """The options object, from ``options=`` or from the keywords (not both)."""
    if options is None:
        return RetrievalOptions(**keywords)
    defaults = RetrievalOptions()
    changed = [name for name, value in keywords.items() if value != getattr(defaults, name)]
    if changed:
        raise ValueError(f"Give the protocol options either as options= or as keywords, not both (got {changed}).")
    return options


@dataclass
class _RelevanceSources:
    """What is relevant and plausible for each query, in the ranking's (caption-sorted) order."""

    layout: Layout
    relevance: Relevance
    kinds: dict[str, dict[str, Any]]  # "pairs" (Recall@K) and, if not the pairs, "positives": direction -> kind
    plausible: Plausibility | None

    @classmethod
    def build(cls, source, options, text_to_image, image_labels, image_classes, plausibility, positives,
              unranked_positives, image_ids, text_ids) -> _RelevanceSources:  # fmt: skip
        num_images, num_texts = source.num_images, source.num_texts
        text_to_image = index_vector(text_to_image, "text_to_image")
        check_text_to_image(text_to_image, num_images, num_texts)
        coco = options.protocol == "coco"
        if coco:
            check_fold_size(num_images, options.fold_size)
        classes = index_vector(image_classes, "image_classes", num_images) if image_classes is not None else None
        layout = Layout(text_to_image.cpu(), num_images, options.fold_size if coco else None)
        if layout.order is not None:
            source.reorder_texts(layout.order)
        device = source.device
        positive_kinds = build_positives(positives, layout, classes, image_ids, text_ids, unranked_positives)
        # everything indexed together with the score blocks lives on their device
        layout.to(device)
        if classes is not None:
            classes = classes.to(device)
        for kind in positive_kinds.values():
            if isinstance(kind, ExplicitPositives):
                kind.keys = kind.keys.to(device)
        kinds = {"pairs": {d: "pairs" for d in DIRECTIONS}}
        if any(kind != "pairs" for kind in positive_kinds.values()):
            kinds["positives"] = positive_kinds
        plausible = build_plausibility(
            layout, options.zetas, image_labels, classes, plausibility, device, LEVEL_TABLE_IMAGES
        )
        return cls(layout, Relevance(layout, classes), kinds, plausible)

    def rank(self, block: torch.Tensor, block_start: int, rows: range, task: Task, workspace: Workspace, ks):
        """Every metric of the query rows ``rows`` of a block (:func:`rank_block`)."""
        device = block.device
        queries = torch.arange(rows.start, rows.stop, device=device)
        everything = (0, block.shape[1])
        views = {name: self.relevance.view(kinds[task.direction], task.direction, queries, everything)
                 for name, kinds in self.kinds.items()}  # fmt: skip
        fold_views = None
        if task.fold_columns is not None:
            fold_views = {name: self.relevance.view(kinds[task.direction], task.direction, queries, task.fold_columns)
                          for name, kinds in self.kinds.items()}  # fmt: skip
        plausible = self.plausible
        return rank_block(
            block[rows.start - block_start : rows.stop - block_start],
            ks=ks,
            relevance=views,
            plausibility=plausible.levels(task.direction, queries, everything) if plausible else None,
            zetas=plausible.zetas if plausible else (),
            fold_columns=task.fold_columns,
            fold_relevance=fold_views,
            workspace=workspace,
        )


def _evaluate(
    source: ScoreSource, sources: _RelevanceSources, options: RetrievalOptions, per_query: dict | None
) -> dict[str, float]:
    """Rank every task and average the per-query values."""
    layout, plausible, ks = sources.layout, sources.plausible, options.ks
    coco = options.protocol == "coco"
    path = score_path(source, int(options.max_memory))
    logger.debug("evaluate_retrieval: %d x %d scores, %s", source.num_images, source.num_texts, path)
    cpu = source.device.type == "cpu"
    if options.num_workers is not None:
        workers = max(1, int(options.num_workers))
    else:
        workers = min(MAX_CPU_WORKERS, torch.get_num_threads()) if cpu else 1
    block_elements = CPU_CHUNK_ELEMENTS if cpu else BLOCK_ELEMENTS
    tasks = plan_tasks(layout, options.chunk_size, coco, block_elements, SUB_BLOCK_ELEMENTS, workers)
    if plausible is not None:
        plausible.image_table()  # shared by the workers: built once, before them
    rows_of_query = {"i2t": None, "t2i": None if layout.order is None else layout.order.cpu().numpy()}
    sizes = {"i2t": source.num_images, "t2i": source.num_texts}
    means = Means()

    def rank(block, block_start, rows, task, workspace):
        return sources.rank(block, block_start, rows, task, workspace, ks)

    for task, ranked in run_tasks(source, tasks, rank, workers, path):  # in task order: sums independent of timing
        for piece, (ranks, fold_ranks) in zip(task.pieces(), ranked):
            accumulate(means, ranks, "", 0, task.direction, ks, plausible)
            if fold_ranks is not None:
                accumulate(means, fold_ranks, "1k/", task.fold, task.direction, ks, plausible)
            if per_query is not None:
                record_per_query(per_query, ranks, piece.start, task.direction, ks, plausible,
                                 sizes[task.direction], rows_of_query[task.direction])  # fmt: skip
    if per_query is not None and plausible is not None and plausible.labels is not None:
        for direction in DIRECTIONS:
            per_zeta = np.stack([per_query[f"{direction}_pmrp_zeta{z}"] for z in plausible.zetas])
            per_query[f"{direction}_pmrp"] = per_zeta.mean(0)  # NaN where a zeta does not score the query
    prefixes = [""] + (["1k/"] if coco else [])
    return collect(means, prefixes, ks, sources.kinds, plausible)


def score_source(scores, scorer, image_embeds, text_embeds, image_log_sigma2, text_log_sigma2,
                  image_samples, text_samples, num_samples, negative_scale, shift, seed) -> ScoreSource:  # fmt: skip
    embeddings_given = any(v is not None for v in (image_embeds, text_embeds, image_samples, text_samples))
    if scores is not None and embeddings_given:
        raise ValueError("Give either scores or embeddings (image_embeds / text_embeds), not both.")
    if scores is not None:
        return MatrixScores(scores)
    if not embeddings_given:
        raise ValueError("Give scores (num_images, num_texts) or image_embeds and text_embeds with a scorer.")
    return build_scorer(
        scorer,
        image_embeds=image_embeds,
        text_embeds=text_embeds,
        image_log_sigma2=image_log_sigma2,
        text_log_sigma2=text_log_sigma2,
        image_samples=image_samples,
        text_samples=text_samples,
        num_samples=num_samples,
        negative_scale=negative_scale,
        shift=shift,
        seed=seed,
    )
