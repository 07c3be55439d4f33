"""Two-stage retrieval glue of the cross-modal-retrieval pipeline: load the re-ranker, re-order the first stage.

Shipped as remote code with the pipeline (:mod:`hf_pcme.pipeline_cross_modal_retrieval`): flat, relative imports only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .rerank import candidate_scores, check_reranker_fits, fuse_scores


def load_reranker(reranker: Any, model: Any, device: Any) -> Any:
    """An IMRAM model (instance or folder / hub id) that fits ``model``, on ``device`` in eval mode; or None."""
    if reranker is None:
        return None
    if isinstance(reranker, (str, Path)):
        from .modeling_imram import IMRAMModel

        reranker = IMRAMModel.from_pretrained(reranker)
    if not callable(getattr(reranker, "score_pairs", None)):
        raise ValueError(f"reranker must be an IMRAMModel (or its folder), got {type(reranker).__name__}.")
    check_reranker_fits(reranker, model)
    return reranker.to(device).eval()


def reranker_features(reranker: Any, model_inputs: dict[str, Any], device: Any) -> Any:
    """The re-ranker's local features of one preprocessed chunk (captions or images)."""
    if model_inputs["modality"] == "text":
        return reranker.encode_texts(model_inputs["input_ids"].to(device), model_inputs["attention_mask"].to(device))
    return reranker.encode_images(model_inputs["pixel_values"].to(device, reranker.dtype))


def rerank_outputs(
    reranker: Any, outputs: dict[str, Any], model_inputs: dict[str, Any], items: Any, top_k: int, device: Any
) -> dict[str, Any]:
    """Re-order each query's first-stage candidates by the re-ranker's score (fused with the first-stage
    score when ``reranker.config.fusion_weight`` < 1) and keep the first ``top_k``.

    ``items`` are the re-ranker's features of the index's corpus (``None`` when the pipeline did not
    build that index). Every per-item field (first-stage score, distance, match probability) moves
    with its item; ``rerank_scores`` and ``first_stage_ranks`` are added.
    """
    if items is None:
        raise ValueError(
            "Re-ranking needs the re-ranker's features of the corpus: pass corpus=[captions or images], or build "
            "the index with this pipeline (retriever.build_index(corpus)) before retriever.set_index(index)."
        )
    queries = reranker_features(reranker, model_inputs, device)
    indices = outputs["indices"]
    device = queries.features.device
    candidates = indices.clamp_min(0).to(device)
    if model_inputs["modality"] == "image":
        scores = candidate_scores(reranker, queries, items, candidates, queries_are_images=True)
    else:
        scores = candidate_scores(reranker, items, queries, candidates, queries_are_images=False)
    scores = scores.masked_fill(indices.to(device) < 0, float("-inf")).cpu()
    # the order: the re-ranker's score, or its fusion with the first-stage score (config.fusion_weight)
    fused = fuse_scores(outputs["scores"].float().cpu(), scores, getattr(reranker.config, "fusion_weight", 1.0))
    order = fused.argsort(dim=1, descending=True, stable=True)[:, :top_k]
    for key in ("scores", "indices", "distances", "match_probability"):
        if outputs[key] is not None:
            outputs[key] = outputs[key].gather(1, order.to(outputs[key].device))
    outputs["rerank_scores"] = scores.gather(1, order)
    outputs["first_stage_ranks"] = order
    return outputs


__all__ = ["load_reranker", "rerank_outputs", "reranker_features"]
