"""Per-query results of the cross-modal-retrieval pipeline: match probabilities of the top-k, result dicts.

Shipped as remote code with the pipeline (:mod:`hf_pcme.pipeline_cross_modal_retrieval`): flat, relative imports only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .distances import sample_gaussian
from .outputs import ProbabilisticEmbedding
from .visualization import attention_heatmap

if TYPE_CHECKING:
    from .index import CrossModalIndex


def match_probabilities(
    model: Any,
    query: ProbabilisticEmbedding,
    modality: str,
    index: CrossModalIndex,
    indices: torch.Tensor,
    seed: int | None,
) -> torch.Tensor:
    """``model.match_probability`` of each query with its own top-k items, ``(Q, k)``.

    Samples (for PCME's Monte-Carlo match probability) are drawn from a generator seeded with
    ``seed`` (default: ``config.inference_seed``), so the same call gives the same numbers.
    """
    num_queries, top_k = indices.shape
    device = query.mean.device
    if seed is None:
        seed = getattr(model.config, "inference_seed", None)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(int(seed))
    num_samples = int(getattr(model.config, "num_samples", 1))
    items = index.item_embeddings(indices.clamp_min(0))
    items = ProbabilisticEmbedding(
        mean=items.mean.to(device),
        log_sigma2=items.log_sigma2.to(device) if items.log_sigma2 is not None else None,
    )
    query, items = (_with_samples(e, num_samples, generator) for e in (query, items))
    probabilities = torch.empty(num_queries, top_k, device=device)
    for q in range(num_queries):
        one_query = _rows(query, slice(q, q + 1))
        its_items = _rows(items, slice(q * top_k, (q + 1) * top_k))
        if modality == "text" and index.modality == "image":
            probabilities[q] = model.match_probability(its_items, one_query)[:, 0]
        else:
            probabilities[q] = model.match_probability(one_query, its_items)[0]
    return probabilities


def format_results(
    model_outputs: dict[str, Any], index: CrossModalIndex, return_attention: bool
) -> list[dict[str, Any]]:
    """One result dict per query of a chunk: its ranked items (best first) and its own uncertainty / attention."""
    outputs = []
    uncertainty = model_outputs["query_uncertainty"]
    for q in range(model_outputs["indices"].shape[0]):
        results = []
        for rank, position in enumerate(model_outputs["indices"][q].tolist()):
            if position < 0:  # an approximate (IVF) search may come back short
                continue
            item: dict[str, Any] = {"id": index.ids[position]}
            if index.texts is not None:
                item["text"] = index.texts[position]
            item["score"] = float(model_outputs["scores"][q, rank])
            if model_outputs["distances"] is not None:
                item["distance"] = float(model_outputs["distances"][q, rank])
            item["match_probability"] = float(model_outputs["match_probability"][q, rank])
            item["uncertainty"] = float(index.uncertainty[position]) if index.uncertainty is not None else None
            if model_outputs.get("rerank_scores") is not None:
                item["rerank_score"] = float(model_outputs["rerank_scores"][q, rank])
                item["first_stage_rank"] = int(model_outputs["first_stage_ranks"][q, rank])
            if return_attention and index.attention is not None:
                item["attention"] = index.attention[position].numpy()
            results.append(item)
        output: dict[str, Any] = {
            "query_uncertainty": float(uncertainty[q]) if uncertainty is not None else None,
            "results": results,
        }
        attention = model_outputs["attention"]
        if return_attention and attention is not None:
            output["attention"] = attention[q].float().numpy()
            if model_outputs["modality"] == "image":
                output["attention_heatmap"] = attention_heatmap(model_outputs["images"][q], attention[q])
        outputs.append(output)
    return outputs


def _rows(embedding: ProbabilisticEmbedding, rows: slice) -> ProbabilisticEmbedding:
    return ProbabilisticEmbedding(
        mean=embedding.mean[rows],
        log_sigma2=embedding.log_sigma2[rows] if embedding.log_sigma2 is not None else None,
        samples=embedding.samples[rows] if embedding.samples is not None else None,
    )


def _with_samples(
    embedding: ProbabilisticEmbedding, num_samples: int, generator: torch.Generator
) -> ProbabilisticEmbedding:
    if embedding.log_sigma2 is None or num_samples < 1:
        return embedding
    samples = sample_gaussian(embedding.mean.float(), embedding.log_sigma2.float(), num_samples, generator)
    return ProbabilisticEmbedding(mean=embedding.mean, log_sigma2=embedding.log_sigma2, samples=samples)


__all__ = ["format_results", "match_probabilities"]
