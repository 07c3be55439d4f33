"""Score sources for retrieval metrics: a given matrix, or embeddings and a scorer chosen by name.

A score source hands out blocks of the ``(num_images, num_texts)`` score matrix (higher = better)
a few rows at a time, in either orientation, so no caller ever holds the whole matrix:

- :meth:`ScoreSource.image_rows` -> ``(r, num_texts)``, images as queries (i2t);
- :meth:`ScoreSource.text_rows` -> ``(r, num_images)``, captions as queries (t2i).

Scorers (``SCORERS``, chosen by name) are the scores of :data:`hf_pcme.scoring.SCORES`, with the
same names, served block by block (each scorer's ``score`` attribute is its scoring class):

- ``"cosine"``, ``"polysemous"`` (best pair over K x K), ``"csd"``: one matrix product per block
  of the score's ``pair_vectors`` (for CSD the augmented vectors of "CSD as an inner product").
- ``"sampled"``: ``log p(match)`` of PCME over ``J x J`` sample pairs; needs the model's
  ``negative_scale`` (a) and ``shift`` (b). Blocks come from
  :func:`hf_pcme.sampled_match.sampled_match_log_prob` (all ``J x J`` distances of a tile from
  products, the sigmoid-mean fused per tile).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from ..distances import best_pair_scores, sample_gaussian
from ..registry import lookup
from ..sampled_match import rerank_top_k, sampled_match_log_prob
from ..scoring import SCORES, BestPairScore, CosineScore, CSDScore, SampledMatchScore, Score


def as_tensor(value: Any, name: str) -> torch.Tensor:
    """A tensor view of a tensor, numpy array or nested list (no copy where possible)."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a tensor or an array, got {type(value).__name__}: {error}") from None


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (as do integers, exactly); everything else is scored in float32."""
    if dtype == torch.float64 or not (dtype.is_floating_point or dtype.is_complex):
        return torch.float64
    return torch.float32


class ScoreSource:
    """Blocks of a ``(num_images, num_texts)`` score matrix (higher = better)."""

    num_images: int
    num_texts: int

    @property
    def device(self) -> torch.device:
        """Where the blocks are computed."""
        raise NotImplementedError

    def image_rows(self, rows: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of the images ``rows`` against every caption, ``(r, num_texts)``.

        ``out``: an optional float32 buffer of that shape that the scorer may fill and return
        (reusing one buffer spares the page faults of a fresh large allocation per block).
        """
        raise NotImplementedError

    def text_rows(self, rows: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of the captions ``rows`` against every image, ``(r, num_images)``; ``out`` as above."""
        raise NotImplementedError

    def reorder_texts(self, order: torch.Tensor) -> None:
        """Make caption ``j`` of every block the caption ``order[j]`` of the inputs."""
        raise NotImplementedError


class MatrixScores(ScoreSource):
    """A score matrix the caller already has, ``(num_images, num_texts)``.

    Integer and float64 matrices are ranked in float64 (exact ties), others in float32.
    """

    def __init__(self, scores: Any) -> None:
        scores = as_tensor(scores, "scores")
        if scores.dim() != 2:
            raise ValueError(f"scores must be 2-D (num_images, num_texts), got shape {tuple(scores.shape)}.")
        self.scores = scores
        self.num_images, self.num_texts = scores.shape
        self.dtype = _score_dtype(scores.dtype)
        self.text_order: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.scores.device

    def reorder_texts(self, order: torch.Tensor) -> None:
        self.text_order = order.to(self.scores.device)

    def image_rows(self, rows: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        block = self.scores[rows]
        if self.text_order is not None:
            block = block.index_select(1, self.text_order)
        return block.to(self.dtype)

    def text_rows(self, rows: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.text_order is not None:
            block = self.scores.index_select(1, self.text_order[rows])
        else:
            block = self.scores[:, rows]
        return block.t().to(self.dtype).contiguous()


def _means(value: Any, name: str, polysemous: bool) -> torch.Tensor:
    mean = as_tensor(value, name)
    if mean.dim() == 3 and mean.shape[1] == 1 and not polysemous:
        mean = mean[:, 0]
    if polysemous:
        if mean.dim() == 2:
            mean = mean.unsqueeze(1)
        if mean.dim() != 3:
            raise ValueError(f"{name} must be (N, K, D) (K embeddings per item), got shape {tuple(mean.shape)}.")
    elif mean.dim() != 2:
        hint = " (K embeddings per item: use scorer='polysemous')" if mean.dim() == 3 else ""
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(mean.shape)}{hint}.")
    if not mean.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating point tensor, got {mean.dtype}.")
    return mean


class InnerProductScorer(ScoreSource):
    """Cosine, polysemous cosine or CSD: one matrix product per block and nothing else.

    The ``pair_vectors`` of the scoring class have the score as their inner product,
    CSD included; they are built once, on the first block, and serve both directions. With K
    embeddings per item the score is the max over the K x K pairs.
    """

    score: type[Score] = CosineScore
    metric: str = "cosine"
    polysemous: bool = False

    def __init__(
        self,
        image_embeds: Any,
        text_embeds: Any,
        image_log_sigma2: Any = None,
        text_log_sigma2: Any = None,
    ) -> None:
        self.image_mean = _means(image_embeds, "image_embeds", self.polysemous)
        self.text_mean = _means(text_embeds, "text_embeds", self.polysemous)
        if self.image_mean.shape[-1] != self.text_mean.shape[-1]:
            raise ValueError(
                f"image_embeds and text_embeds must have the same size D, got {tuple(self.image_mean.shape)} "
                f"and {tuple(self.text_mean.shape)}."
            )
        self.image_log_sigma2 = self._log_sigma2(image_log_sigma2, self.image_mean, "image")
        self.text_log_sigma2 = self._log_sigma2(text_log_sigma2, self.text_mean, "text")
        self.num_images = self.image_mean.shape[0]
        self.num_texts = self.text_mean.shape[0]
        self._vectors: dict[str, torch.Tensor] | None = None
        self._vectors_lock = threading.Lock()  # blocks are scored on several threads

    def _log_sigma2(self, value: Any, mean: torch.Tensor, side: str) -> torch.Tensor | None:
        if not self.score.needs_variance:
            return None
        if value is None:
            raise ValueError(f"scorer={self.metric!r} needs {side}_log_sigma2 (the log variances of the {side} embeddings).")
        log_sigma2 = as_tensor(value, f"{side}_log_sigma2")
        if log_sigma2.shape != mean.shape:
            raise ValueError(
                f"{side}_log_sigma2 must have the shape of {side}_embeds {tuple(mean.shape)}, "
                f"got {tuple(log_sigma2.shape)}."
            )
        return log_sigma2

    @property
    def device(self) -> torch.device:
        return self.image_mean.device

    def reorder_texts(self, order: torch.Tensor) -> None:
        order = order.to(self.text_mean.device)
        self.text_mean = self.text_mean.index_select(0, order)
        if self.text_log_sigma2 is not None:
            self.text_log_sigma2 = self.text_log_sigma2.index_select(0, order)
        self._vectors = None

    def _score_vectors(self) -> dict[str, torch.Tensor]:
        with self._vectors_lock:
            if self._vectors is None:
                score = self.score()
                self._vectors = {
                    "image": score.pair_vectors(self.image_mean, self.image_log_sigma2, "left"),
                    "text": score.pair_vectors(self.text_mean, self.text_log_sigma2, "right"),
                }
            return self._vectors

    def _block(self, direction: str, rows: slice, out: torch.Tensor | None) -> torch.Tensor:
        vectors = self._score_vectors()
        query_side, item_side = ("image", "text") if direction == "i2t" else ("text", "image")
        query, items = vectors[query_side][rows], vectors[item_side]
        num_rows, query_embeds = query.shape[:2]
        item_embeds = items.shape[1]
        if query_embeds > 1 or item_embeds > 1 or out is None or out.dtype != torch.float32:
            out = None
        scores = torch.mm(query.reshape(num_rows * query_embeds, -1), items.reshape(-1, items.shape[-1]).t(), out=out)
        return best_pair_scores(scores, num_rows, query_embeds, item_embeds)

    def image_rows(self, rows: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._block("i2t", rows, out)

    def text_rows(self, rows: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._block("t2i", rows, out)


class CosineScorer(InnerProductScorer):
    """Cosine of the means (PCME's "matmul" ranking; VSE++, InfoNCE)."""

    score = CosineScore
    metric = "cosine"


class CSDScorer(InnerProductScorer):
    """``-CSD``, PCME++'s closed-form sampled distance (exact, via augmented vectors)."""

    score = CSDScore
    metric = "csd"


class PolysemousScorer(InnerProductScorer):
    """PVSE: the best cosine over the K x K embedding pairs of ``(N, K, D)`` means."""

    score = BestPairScore
    metric = "cosine"
    polysemous = True


class SampledMatchScorer(ScoreSource):
    """``log p(match)`` of PCME over J x J Monte-Carlo sample pairs (J^2 times the products of cosine).

    ``p = 1/J^2 sum_{j, j'} sigmoid(2 (b - a ||z_x^j - z_y^j'||))`` (PCME, Chun et al., CVPR 2021;
    docs/formulas.md), computed block by block by :func:`hf_pcme.sampled_match.sampled_match_log_prob`
    with at most ``max_memory`` bytes of work memory per tile (default: its own, cache-sized on CPU).

    Samples come from ``image_samples`` / ``text_samples`` ``(N, J, D)`` (e.g.
    ``ProbabilisticEmbedding.samples``) or are drawn once, ``num_samples`` per item, from the means
    and log variances with a generator seeded by ``seed``, so both directions see the same samples.

    ``rerank_top_k=K`` (needs the means and log variances): each query's items are ranked by
    ``-CSD`` (PCME++'s closed-form sampled distance, one product) and only its top ``K`` are
    re-scored by ``log p`` (:func:`hf_pcme.sampled_match.rerank_top_k`); the other items keep the
    CSD order below them. An approximation of the sampled ranking: exact wherever the sampled top
    items are among the CSD top ``K``.
    """

    score = SampledMatchScore

    def __init__(
        self,
        image_embeds: Any = None,
        text_embeds: Any = None,
        image_log_sigma2: Any = None,
        text_log_sigma2: Any = None,
        *,
        image_samples: Any = None,
        text_samples: Any = None,
        num_samples: int = 7,
        negative_scale: Any = None,
        shift: Any = None,
        seed: int = 0,
        max_memory: int | None = None,
        rerank_top_k: int | None = None,
    ) -> None:
        if negative_scale is None or shift is None:
            raise ValueError(
                "scorer='sampled' needs negative_scale and shift, the model's learned a and b "
                "(model.negative_scale, model.shift)."
            )
        self.negative_scale = float(as_tensor(negative_scale, "negative_scale").reshape(-1)[0])
        self.shift = float(as_tensor(shift, "shift").reshape(-1)[0])
        self._score = SampledMatchScore(self.negative_scale, self.shift)
        if max_memory is not None and int(max_memory) < 1:
            raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory}.")
        self.max_memory = max_memory
        # different seeds for images and captions, so their noise is independent
        self.image_samples = self._samples(
            image_samples, image_embeds, image_log_sigma2, num_samples, 2 * seed, "image"
        )
        self.text_samples = self._samples(text_samples, text_embeds, text_log_sigma2, num_samples, 2 * seed + 1, "text")
        if self.image_samples.shape[-1] != self.text_samples.shape[-1]:
            raise ValueError("image and text samples must have the same size D.")
        self.num_images = self.image_samples.shape[0]
        self.num_texts = self.text_samples.shape[0]
        self.rerank_top_k = rerank_top_k
        self._candidates: CSDScorer | None = None
        if rerank_top_k is not None:
            if isinstance(rerank_top_k, bool) or not isinstance(rerank_top_k, int) or rerank_top_k < 1:
                raise ValueError(f"rerank_top_k must be a positive integer, got {rerank_top_k!r}.")
            if any(value is None for value in (image_embeds, text_embeds, image_log_sigma2, text_log_sigma2)):
                raise ValueError(
                    "rerank_top_k ranks candidates by CSD: it needs image_embeds, text_embeds, image_log_sigma2 "
                    "and text_log_sigma2."
                )
            self._candidates = CSDScorer(image_embeds, text_embeds, image_log_sigma2, text_log_sigma2)
            if (self._candidates.num_images, self._candidates.num_texts) != (self.num_images, self.num_texts):
                raise ValueError("the means and the samples must hold the same images and captions.")

    @staticmethod
    def _samples(samples, mean, log_sigma2, num_samples: int, seed: int, side: str) -> torch.Tensor:
        if samples is not None:
            samples = as_tensor(samples, f"{side}_samples")
            if samples.dim() != 3:
                raise ValueError(f"{side}_samples must be (N, J, D), got shape {tuple(samples.shape)}.")
            return samples
        if mean is None or log_sigma2 is None:
            raise ValueError(
                f"scorer='sampled' needs {side}_samples (N, J, D), or {side}_embeds and {side}_log_sigma2 to draw them."
            )
        mean = _means(mean, f"{side}_embeds", polysemous=False)
        log_sigma2 = as_tensor(log_sigma2, f"{side}_log_sigma2")
        if log_sigma2.shape != mean.shape:
            raise ValueError(f"{side}_log_sigma2 must have the shape of {side}_embeds {tuple(mean.shape)}.")
        generator = torch.Generator(device=mean.device).manual_seed(int(seed))
        return sample_gaussian(mean.float(), log_sigma2.float(), num_samples, generator=generator)

    @property
    def device(self) -> torch.device:
        return self.image_samples.device

    def reorder_texts(self, order: torch.Tensor) -> None:
        self.text_samples = self.text_samples.index_select(0, order.to(self.text_samples.device))
        if self._candidates is not None:
            self._candidates.reorder_texts(order)

    def image_rows(self, rows: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        if self._candidates is not None:
            candidates = self._candidates.image_rows(rows, out=out)
            return self._rerank(candidates, self.image_samples[rows], self.text_samples)
        return self._log_prob(self.image_samples[rows], self.text_samples, out)

    def text_rows(self, rows: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        if self._candidates is not None:
            candidates = self._candidates.text_rows(rows, out=out)
            return self._rerank(candidates, self.text_samples[rows], self.image_samples)
        return self._log_prob(self.text_samples[rows], self.image_samples, out)

    def _rerank(self, candidates: torch.Tensor, queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return rerank_top_k(
            candidates, queries, items, self.negative_scale, self.shift, self.rerank_top_k, out=candidates
        )

    def _log_prob(self, queries: torch.Tensor, items: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        shape = (queries.shape[0], items.shape[0])
        if out is not None and (
            tuple(out.shape) != shape
            or out.dtype != torch.promote_types(torch.float32, torch.promote_types(queries.dtype, items.dtype))
            or out.device != queries.device
            or out.stride(-1) != 1
        ):
            out = None  # the buffer is an offer: scores in float64 (float64 samples) get their own
        return sampled_match_log_prob(
            queries, items, self.negative_scale, self.shift, max_memory=self.max_memory, out=out
        )


def _inner_product_scorer(name: str, score: type[Score]) -> type[InnerProductScorer]:
    """The block source of a searchable score registered in ``SCORES`` only (one product per block)."""
    return type(f"{score.__name__}Scorer", (InnerProductScorer,),
                {"score": score, "metric": name, "__doc__": f"Score {name!r} as one matrix product per block."})


#: Scorer name -> block source, one per score of :data:`hf_pcme.scoring.SCORES` (same names;
#: tests/test_scoring.py checks they agree). Every searchable (inner-product) score of ``SCORES``
#: gets a block source here without an edit; a score that is not an inner product needs its own
#: :class:`ScoreSource` and a line here.
SCORERS: dict[str, type[ScoreSource]] = {
    "cosine": CosineScorer,
    "csd": CSDScorer,
    "sampled": SampledMatchScorer,
    "polysemous": PolysemousScorer,
}
SCORERS.update({name: _inner_product_scorer(name, score) for name, score in SCORES.items()
                if score.searchable and name not in SCORERS})


def build_scorer(
    name: str,
    *,
    image_embeds: Any = None,
    text_embeds: Any = None,
    image_log_sigma2: Any = None,
    text_log_sigma2: Any = None,
    image_samples: Any = None,
    text_samples: Any = None,
    num_samples: int = 7,
    negative_scale: Any = None,
    shift: Any = None,
    seed: int = 0,
) -> ScoreSource:
    """The score source of scorer ``name`` (a key of :data:`SCORERS`) over these embeddings."""
    scorer_class = lookup(SCORERS, name, "scorer")
    if scorer_class is SampledMatchScorer:
        return SampledMatchScorer(
            image_embeds,
            text_embeds,
            image_log_sigma2,
            text_log_sigma2,
            image_samples=image_samples,
            text_samples=text_samples,
            num_samples=num_samples,
            negative_scale=negative_scale,
            shift=shift,
            seed=seed,
        )
    if image_embeds is None or text_embeds is None:
        raise ValueError(f"scorer={name!r} needs image_embeds and text_embeds (or pass scores=).")
    return scorer_class(image_embeds, text_embeds, image_log_sigma2, text_log_sigma2)
