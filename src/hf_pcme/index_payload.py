"""What a :class:`~hf_pcme.index.CrossModalIndex` keeps next to its search vectors, checked on the way in.

Ids (JSON-safe str / int), texts, log variances, attention maps; the per-item uncertainty.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .distances import iter_row_chunks
from .outputs import ProbabilisticEmbedding
from .registry import check_choice

MODALITIES = ("text", "image")


def check_payload(
    mean: Any, log_sigma2: Any, attention: Any, ids: Any, texts: Any, modality: str
) -> tuple[torch.Tensor | None, torch.Tensor | None, list, list[str] | None]:
    """Validate what an index stores next to the means; returns log_sigma2, attention (float32, CPU), ids, texts."""
    check_choice(modality, MODALITIES, "modality")
    if not isinstance(mean, torch.Tensor):
        raise TypeError(f"mean must be a torch.Tensor, got {type(mean).__name__}.")
    if mean.dim() not in (2, 3):
        raise ValueError(f"mean must be (N, D) or (N, K, D), got shape {tuple(mean.shape)}.")
    num_items = mean.shape[0]
    if num_items == 0:
        raise ValueError("The corpus is empty: mean has 0 rows. Give at least one item to index.")
    if log_sigma2 is not None:
        if mean.dim() != 2 or log_sigma2.shape != mean.shape:
            raise ValueError(
                f"log_sigma2 must have the shape of mean (N, D) = {tuple(mean.shape)}, got {tuple(log_sigma2.shape)}."
            )
        log_sigma2 = log_sigma2.detach().float().cpu()
    ids = check_ids(ids, num_items)
    if texts is not None:
        texts = [str(t) for t in texts]
        if len(texts) != num_items:
            raise ValueError(f"texts must have one entry per item ({num_items}), got {len(texts)}.")
    if attention is not None:
        if attention.dim() != 3 or attention.shape[0] != num_items:
            raise ValueError(f"attention must be (N, K, L) with N = {num_items}, got {tuple(attention.shape)}.")
        attention = attention.detach().float().cpu()
    return log_sigma2, attention, ids, texts


def check_ids(ids: Sequence[Any] | None, num_items: int) -> list:
    if ids is None:
        return list(range(num_items))
    ids = [str(i) if isinstance(i, Path) else i for i in ids]
    if len(ids) != num_items:
        raise ValueError(f"ids must have one entry per item ({num_items}), got {len(ids)}.")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (str, int)):
            raise ValueError(f"ids must be str or int (they are saved as JSON), got {type(i).__name__}: {i!r}.")
    return ids


def item_uncertainty(log_sigma2: torch.Tensor | None, block_rows: int = 65536) -> torch.Tensor | None:
    """``ProbabilisticEmbedding.uncertainty`` (mean over D of sigma^2) per item, block by block."""
    if log_sigma2 is None:
        return None
    blocks = [
        ProbabilisticEmbedding(log_sigma2=log_sigma2[rows]).uncertainty
        for rows in iter_row_chunks(log_sigma2.shape[0], block_rows)
    ]
    return torch.cat(blocks)


def check_query(
    query_mean: torch.Tensor,
    query_log_sigma2: torch.Tensor | None,
    top_k: Any,
    num_items: int,
    embed_dim: int,
    metric: str,
    item_log_sigma2: torch.Tensor | None,
) -> None:
    """Raise a ``ValueError`` naming the argument if a query does not fit an index of ``num_items`` items of size D."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    if top_k > num_items:
        raise ValueError(
            f"top_k={top_k} is larger than the corpus ({num_items} items); ask for at most {num_items}."
        )
    if query_mean.dim() not in (2, 3) or query_mean.shape[-1] != embed_dim:
        raise ValueError(
            f"query_mean must be (Q, {embed_dim}) or (Q, K, {embed_dim}) to match the index, "
            f"got {tuple(query_mean.shape)}: was the index built by another model?"
        )
    if query_log_sigma2 is not None and (query_mean.dim() != 2 or query_log_sigma2.shape != query_mean.shape):
        raise ValueError(
            f"query_log_sigma2 must have the shape of query_mean {tuple(query_mean.shape)}, "
            f"got {tuple(query_log_sigma2.shape)}."
        )
    if metric == "csd" and (query_log_sigma2 is None) != (item_log_sigma2 is None):
        which = "the index has variances but the queries do not" if query_log_sigma2 is None else (
            "the queries have variances but the index does not"
        )
        raise ValueError(f"CSD needs variances on both sides or neither: {which}. Use one model for both.")


__all__ = ["MODALITIES", "check_ids", "check_payload", "check_query", "item_uncertainty"]
