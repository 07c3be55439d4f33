"""How a model ranks a pair: one class per score, one registry (:data:`SCORES`), one default.

Every score maps an image and a caption to a number, higher = better:

- ``"cosine"`` (:class:`CosineScore`): ``mu_v . mu_t / (|mu_v| |mu_t|)`` (VSE++, InfoNCE; PCME's
  "matmul" ranking of the means).
- ``"polysemous"`` (:class:`BestPairScore`): PVSE's ``max_{k, k'} cos(mu_v^k, mu_t^k')`` over the
  K x K' embeddings of ``(N, K, D)`` means (Song & Soleymani, CVPR 2019).
- ``"csd"`` (:class:`CSDScore`): ``-CSD = -(|mu_v - mu_t|^2 + sum sigma_v^2 + sum sigma_t^2)``,
  PCME++'s closed-form sampled distance (Chun, ICLR 2024).
- ``"sampled"`` (:class:`SampledMatchScore`): ``log p(match)``, PCME's Monte-Carlo match probability
  ``p = 1/(J J') sum_{j, j'} sigmoid(2 (-a |z_v^j - z_t^j'| + b))`` (Chun et al., CVPR 2021), which
  ranks exactly like ``p``.
- ``"euclidean"`` (:class:`~hf_pcme.score_euclidean.EuclideanScore`, its own file): ``-|mu_v - mu_t|^2``
  (CONTRIBUTING.md's worked example of a new score).

Each gives :meth:`Score.pairwise` ``(N, M)``. The scores that are an inner product exactly
(``searchable = True``: cosine, best pair, CSD, Euclidean) also give the vectors the index and the metrics
multiply: :meth:`Score.item_vectors` and :meth:`Score.query_vectors` (``score = q . k - offset``),
and, derived from those two, :meth:`Score.pair_vectors` (``left(v) . right(t) = score`` with no
offset, one pair of matrices for both retrieval directions). For CSD there is one encoding
(docs/formulas.md, "CSD as an inner product"), with ``c = |mu|^2 + sum sigma^2``:

    item(t) = [2 mu_t, -c_t]           query(v) = [mu_v, 1], offset c_v
    left(v) = [item(v), 1]             right(t) = [query(t), -offset(t)]

so ``q . k - offset = left . right = 2 mu_v . mu_t - c_v - c_t = -CSD``.

:func:`default_score` picks the score a model was trained for; :func:`default_search_score` the
exact inner-product score an index searches with. The model (``PCMEModel.pairwise_logits``), the
index (``hf_pcme.index``), the metrics (``hf_pcme.metrics.scorers``), the evaluation and the
pipeline all rank through this module. Model-side file: relative imports only.
Modelled on pytorch-metric-learning's ``BaseDistance`` and sentence-transformers' ``score_function``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from .distances import max_pair_similarity, pairwise_csd, pairwise_sampled_match_log_prob
from .registry import lookup
from .score_common import SEARCH_VECTOR_CHUNK_ROWS, Score, as_embedding_rows  # noqa: F401  (public here too)
from .score_common import mean_and_log_sigma2 as _mean_and_log_sigma2
from .score_euclidean import EuclideanScore

def _csd_offset(mean: torch.Tensor, log_sigma2: torch.Tensor | None) -> torch.Tensor:
    """``c = |mu|^2 + sum_d sigma^2`` per embedding, shape ``(N, K)``: CSD = c_v + c_t - 2 mu_v . mu_t."""
    if log_sigma2 is None:
        variance = mean.new_zeros(mean.shape[:2])
    else:
        variance = log_sigma2.float().exp().sum(-1, keepdim=True).expand(mean.shape[:2])
    return mean.pow(2).sum(-1) + variance


class CosineScore(Score):
    """Cosine of the means, ``mu_v . mu_t / (|mu_v| |mu_t|)``; item and query vectors ``mu / |mu|``."""

    name = "cosine"
    searchable = True

    def pairwise(self, image_embeds: Any, text_embeds: Any) -> torch.Tensor:
        image = F.normalize(_mean_and_log_sigma2(image_embeds)[0].float(), dim=-1)
        text = F.normalize(_mean_and_log_sigma2(text_embeds)[0].float(), dim=-1)
        if image.dim() == 2 and text.dim() == 2:
            return image @ text.t()
        return max_pair_similarity(as_embedding_rows(image, "image_embeds"), as_embedding_rows(text, "text_embeds"))

    def _item_block(self, mean: torch.Tensor, log_sigma2: torch.Tensor | None) -> torch.Tensor:
        return F.normalize(mean.float(), dim=-1)

    def query_vectors(
        self, mean: torch.Tensor, log_sigma2: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean = as_embedding_rows(mean, "query_mean")
        return F.normalize(mean, dim=-1), mean.new_zeros(mean.shape[:2])


class BestPairScore(CosineScore):
    """PVSE's best pair: ``max_{k, k'} cos(mu_v^k, mu_t^k')`` over ``(N, K, D)`` means.

    Same vectors as cosine, K per item; searches take the max over the K x K' products.
    """

    name = "polysemous"


class CSDScore(Score):
    """``-CSD(v, t) = -(|mu_v - mu_t|^2 + sum_d sigma_v^2 + sum_d sigma_t^2)`` (PCME++).

    Item vectors ``[2 mu, -c]``, query vectors ``[mu, 1]`` with offset ``c = |mu|^2 + sum sigma^2``
    (D + 1 dims, the format of saved indexes); point embeddings (no ``log_sigma2``) have c = |mu|^2.
    """

    name = "csd"
    searchable = True
    needs_variance = True
    extra_dims = 1

    def pairwise(self, image_embeds: Any, text_embeds: Any) -> torch.Tensor:
        image_mean, image_log_sigma2 = _mean_and_log_sigma2(image_embeds)
        text_mean, text_log_sigma2 = _mean_and_log_sigma2(text_embeds)
        if image_log_sigma2 is None or text_log_sigma2 is None:
            raise ValueError("score 'csd' needs image and text log variances (ProbabilisticEmbedding.log_sigma2).")
        return -pairwise_csd(image_mean, image_log_sigma2, text_mean, text_log_sigma2)

    def _item_block(self, mean: torch.Tensor, log_sigma2: torch.Tensor | None) -> torch.Tensor:
        mean = mean.float()
        return torch.cat([2.0 * mean, -_csd_offset(mean, log_sigma2).unsqueeze(-1)], dim=-1)

    def query_vectors(
        self, mean: torch.Tensor, log_sigma2: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean = as_embedding_rows(mean, "query_mean")
        return torch.cat([mean, torch.ones_like(mean[..., :1])], dim=-1), _csd_offset(mean, log_sigma2)

    def means_from_item_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        # 2 * mu / 2 is exact in floating point, so nothing is lost by storing only the item vectors.
        return vectors[..., :-1] * 0.5


class SampledMatchScore(Score):
    """``log p(match)`` of PCME over J x J' Monte-Carlo samples, with the model's ``a`` and ``b``.

    Embeds without samples (``ProbabilisticEmbedding.samples``) use their means as one sample each
    (a point is a Gaussian with zero variance; a polysemous item's K embeddings act as its samples).
    """

    name = "sampled"
    needs_variance = True

    def __init__(self, negative_scale: torch.Tensor | float, shift: torch.Tensor | float) -> None:
        self.negative_scale = negative_scale
        self.shift = shift

    def pairwise(self, image_embeds: Any, text_embeds: Any) -> torch.Tensor:
        return self.log_probabilities(image_embeds, text_embeds)[0]

    def log_probabilities(self, image_embeds: Any, text_embeds: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p, log (1 - p))``, each ``(N, M)`` (``hf_pcme.distances.pairwise_sampled_match_log_prob``)."""
        return pairwise_sampled_match_log_prob(
            as_samples(image_embeds), as_samples(text_embeds), self.negative_scale, self.shift
        )


def as_samples(embeds: Any) -> torch.Tensor:
    """``(N, J, D)`` samples of an embedding: its samples, else its (K) means as samples."""
    if not isinstance(embeds, torch.Tensor):  # a ProbabilisticEmbedding (duck-typed, see above)
        if embeds.samples is not None:
            return embeds.samples
        embeds = embeds.mean
    return embeds if embeds.dim() == 3 else embeds.unsqueeze(1)


#: Score name -> class. A new score is one class (its own file, subclassing ``score_common.Score``) and one line here.
SCORES: dict[str, type[Score]] = {
    "cosine": CosineScore,
    "csd": CSDScore,
    "sampled": SampledMatchScore,
    "polysemous": BestPairScore,
    "euclidean": EuclideanScore,
}

#: Names of the scores an index can search exactly: the inner-product ones (``polysemous`` is searched
#: as ``cosine``, K rows per item).
SEARCH_SCORES = tuple(name for name, score in SCORES.items() if score.searchable and name != "polysemous")

#: Head types with K embeddings per item (mirrors ``heads.MULTI_EMBEDDING_HEADS``; importing heads is nn code).
_MULTI_EMBEDDING_HEADS = ("polysemous", "diversified_attention")


def build_score(name: str, **params: Any) -> Score:
    """An instance of score ``name`` (a key of :data:`SCORES`); ``sampled`` takes ``negative_scale``, ``shift``."""
    score_class = lookup(SCORES, name, "score")
    if score_class is SampledMatchScore:
        if params.get("negative_scale") is None or params.get("shift") is None:
            raise ValueError("score 'sampled' needs negative_scale and shift (the model's a and b).")
        return SampledMatchScore(params["negative_scale"], params["shift"])
    return score_class()


def default_score(config: Any) -> str:
    """The score a model was trained to rank by, from its config.

    ``"cosine"`` for deterministic heads, ``"polysemous"`` for heads with K embeddings per item,
    ``"csd"`` for probabilistic heads with ``match_function="csd"`` (PCME++), ``"sampled"`` for the
    other probabilistic heads (PCME); ``config.ranking_score`` when the config names one.
    """
    ranking_score = getattr(config, "ranking_score", None)
    if ranking_score is not None:
        return ranking_score
    head_type = getattr(config, "head_type", None)
    if head_type == "deterministic":
        return "cosine"
    if head_type in _MULTI_EMBEDDING_HEADS:
        return "polysemous"
    return "csd" if getattr(config, "match_function", None) == "csd" else "sampled"


def default_search_score(config: Any) -> str:
    """The exact inner-product score an index searches with (a name of :data:`SEARCH_SCORES`).

    ``"csd"`` for PCME++ models; ``"cosine"`` otherwise: the sampled match probability is not an
    inner product, so PCME models are searched by the cosine of their means (PCME's "matmul"
    ranking), and best-pair (PVSE) search is cosine over K rows per item.
    """
    if getattr(config, "head_type", None) != "probabilistic":
        return "cosine"
    name = default_score(config)
    return name if name in SEARCH_SCORES else "cosine"


# Old names (hf_pcme.distances, hf_pcme.index), kept as thin aliases of the score classes.
def item_search_vectors(mean: torch.Tensor, log_sigma2: torch.Tensor | None, metric: str) -> torch.Tensor:
    """``SCORES[metric]().item_vectors(mean, log_sigma2)``."""
    return lookup(SCORES, metric, "metric")().item_vectors(mean, log_sigma2)


def query_search_vectors(
    mean: torch.Tensor, log_sigma2: torch.Tensor | None, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``SCORES[metric]().query_vectors(mean, log_sigma2)``."""
    return lookup(SCORES, metric, "metric")().query_vectors(mean, log_sigma2)


def score_vectors(
    mean: torch.Tensor, log_sigma2: torch.Tensor | None, metric: str, side: Literal["left", "right"]
) -> torch.Tensor:
    """``SCORES[metric]().pair_vectors(mean, log_sigma2, side)``."""
    return lookup(SCORES, metric, "metric")().pair_vectors(mean, log_sigma2, side)


__all__ = [
    "SCORES",
    "SEARCH_SCORES",
    "BestPairScore",
    "CSDScore",
    "CosineScore",
    "EuclideanScore",
    "SampledMatchScore",
    "Score",
    "as_samples",
    "build_score",
    "default_score",
    "default_search_score",
]
