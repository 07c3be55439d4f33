"""Two-stage retrieval: a dual encoder's top-K, re-ranked by a cross-attention model (IMRAM).

The dual encoder ranks the whole gallery cheaply; the re-ranker scores only each query's first-stage
top-K candidates. The re-ranked ranking of a query is: its top-K in re-ranker order (IMRAM's score, or
its fusion with the first-stage score: :func:`fuse_scores`, ``IMRAMConfig.fusion_weight``), then every
other item in first-stage order. :func:`rerank_score_matrix` writes that ranking as a score matrix (so
every ranking metric applies unchanged): the top-K get their re-ranker scores shifted above the row's
largest first-stage score, the rest keep their first-stage scores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: Pairs scored by the re-ranker at once.
RERANK_PAIR_BATCH = 4096

#: Config keys that say nothing about what a tower computes (ignored when comparing towers).
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype", "_attn_implementation_autoset")


def _tower_signature(config: Any) -> dict:
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {key: value for key, value in values.items() if key not in _VOLATILE_CONFIG_KEYS}


def check_reranker_fits(reranker: Any, model: Any) -> None:
    """Raise a ``ValueError`` unless ``reranker`` reads the inputs ``model`` reads (the same tower configs).

    The re-ranker is fed the dual encoder's processed inputs (pixel values, token ids), so its towers must
    have been built for the same image size / channels and the same vocabulary.
    """
    for name in ("vision_config", "text_config"):
        ours = getattr(getattr(model, "config", None), name, None)
        theirs = getattr(getattr(reranker, "config", None), name, None)
        if ours is None or theirs is None:
            raise ValueError(f"reranker and model must both have a config.{name} (an IMRAMModel and a PCMEModel).")
        a, b = _tower_signature(ours), _tower_signature(theirs)
        if a != b:
            differing = sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))
            raise ValueError(
                f"The reranker's towers do not fit the model: its {name} differs in {', '.join(differing[:6])}. "
                "Train the reranker on this dual encoder (IMRAMModel.from_dual_encoder(model) or "
                "model.pretrained in configs/shapes_imram.yaml) so that it reads the same inputs."
            )


def check_rerank_top_k(rerank_top_k: int, top_k: int | None = None) -> int:
    """``rerank_top_k`` as an int, checked: >= 1 and >= ``top_k`` (the re-ranked list must cover what is returned)."""
    if isinstance(rerank_top_k, bool) or not isinstance(rerank_top_k, int) or rerank_top_k < 1:
        raise ValueError(f"rerank_top_k must be a positive integer, got {rerank_top_k!r}.")
    if top_k is not None and rerank_top_k < top_k:
        raise ValueError(
            f"rerank_top_k ({rerank_top_k}) is smaller than top_k ({top_k}): the re-ranker would not see every "
            "returned item. Use rerank_top_k >= top_k."
        )
    return rerank_top_k


@torch.no_grad()
def candidate_scores(
    reranker: Any, images: Any, texts: Any, candidates: torch.Tensor, queries_are_images: bool
) -> torch.Tensor:
    """Re-ranker scores ``(Q, K)`` of each query with its candidate items ``candidates (Q, K)``.

    ``images`` / ``texts`` are the re-ranker's local features (:class:`~hf_pcme.modeling_imram.LocalFeatures`);
    the queries are the rows of ``images`` (``queries_are_images``) or of ``texts``, the candidates index the other.
    """
    num_queries, top_k = candidates.shape
    query_rows = torch.arange(num_queries, device=candidates.device).repeat_interleave(top_k)
    item_rows = candidates.reshape(-1)
    image_rows, text_rows = (query_rows, item_rows) if queries_are_images else (item_rows, query_rows)
    scores = []
    for start in range(0, image_rows.numel(), RERANK_PAIR_BATCH):
        chunk = slice(start, start + RERANK_PAIR_BATCH)
        scores.append(reranker.score_pairs(images.select(image_rows[chunk]), texts.select(text_rows[chunk])).float())
    return torch.cat(scores).reshape(num_queries, top_k)


def fuse_scores(first_stage: torch.Tensor, reranker_scores: torch.Tensor, fusion_weight: float) -> torch.Tensor:
    """Final scores ``(Q, K)`` of each query's K candidates: ``(1 - alpha) z(first_stage) + alpha z(reranker_scores)``.

    ``z`` standardises a row over its candidates (``(s - mean) / std``), so the weight ``alpha`` does not
    depend on either stage's scale (a match probability, a distance, a sum of K cosines). Entries that are
    not finite in either input (missing candidates) are left out of the row statistics and come back
    ``-inf``. ``alpha = 1`` returns ``reranker_scores`` unchanged (rank by the re-ranker alone).
    """
    alpha = float(fusion_weight)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"fusion_weight must be in [0, 1], got {fusion_weight}.")
    if first_stage.shape != reranker_scores.shape:
        raise ValueError(f"first_stage {tuple(first_stage.shape)} and reranker_scores {tuple(reranker_scores.shape)} differ in shape.")
    if alpha == 1.0:
        return reranker_scores
    first, second = first_stage.double(), reranker_scores.double().to(first_stage.device)
    valid = torch.isfinite(first) & torch.isfinite(second)

    def standardise(values: torch.Tensor) -> torch.Tensor:
        weights = valid.to(values.dtype)
        count = weights.sum(1, keepdim=True).clamp_min(1.0)
        filled = values.masked_fill(~valid, 0.0)
        mean = filled.sum(1, keepdim=True) / count
        variance = ((filled - mean) ** 2 * weights).sum(1, keepdim=True) / count
        return (filled - mean) / variance.sqrt().clamp_min(1e-12)

    fused = (1.0 - alpha) * standardise(first) + alpha * standardise(second)
    return fused.masked_fill(~valid, float("-inf")).to(reranker_scores.dtype)


def rerank_score_matrix(first_stage: torch.Tensor, candidates: torch.Tensor, candidate_scores: torch.Tensor) -> torch.Tensor:
    """Scores ``(Q, N)`` whose ranking is: the ``candidates (Q, K)`` by ``candidate_scores (Q, K)``, then the rest by ``first_stage``.

    Each row's candidates get ``s - min_row(s) + max_row(first_stage) + 1``, which keeps their order
    and puts them above every first-stage score of the row. float32 (float64 if the input is).
    """
    dtype = torch.float64 if first_stage.dtype == torch.float64 else torch.float32
    scores = first_stage.to(dtype).clone()
    reranked = candidate_scores.to(dtype)
    offset = scores.amax(dim=1, keepdim=True) - reranked.amin(dim=1, keepdim=True) + 1.0
    return scores.scatter_(1, candidates, reranked + offset)


def rerank(
    first_stage: torch.Tensor,
    top_k: int,
    score_candidates: Callable[[torch.Tensor], torch.Tensor],
    fusion_weight: float = 1.0,
) -> torch.Tensor:
    """Re-ranked score matrix of queries ``first_stage (Q, N)``: ``score_candidates(indices (Q, K)) -> (Q, K)`` scores each top-K.

    The top-K are ordered by :func:`fuse_scores` of their first-stage and re-ranker scores (``fusion_weight``
    1 = the re-ranker's scores alone).
    """
    top_k = min(check_rerank_top_k(top_k), first_stage.shape[1])
    candidates = first_stage.topk(top_k, dim=1).indices
    scores = fuse_scores(first_stage.gather(1, candidates), score_candidates(candidates), fusion_weight)
    return rerank_score_matrix(first_stage, candidates, scores)


__all__ = ["candidate_scores", "check_rerank_top_k", "check_reranker_fits", "fuse_scores", "rerank", "rerank_score_matrix"]
