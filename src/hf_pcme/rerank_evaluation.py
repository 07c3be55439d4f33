"""Metrics of a dual encoder whose top-K is re-ranked by IMRAM, on a :class:`RetrievalSplit`.

Both directions are re-ranked separately (each image's top-K captions; each caption's top-K images),
so the metrics come from two score matrices: the ``i2t_*`` keys from the one whose image rows are
re-ranked, the ``t2i_*`` keys from the one whose caption columns are; ``rsum`` adds the six recalls.
With the COCO 1K protocol the candidates are the top-K over the whole 5K split, ranked within each fold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .modeling_imram import IMRAMModel, LocalFeatures, concat_local_features
from .outputs import ProbabilisticEmbedding
from .rerank import candidate_scores, check_rerank_top_k, check_reranker_fits, fuse_scores, rerank, rerank_score_matrix

#: The fusion weights alpha that :func:`select_fusion_weight` tries by default.
FUSION_WEIGHT_GRID = tuple(round(0.1 * step, 1) for step in range(11))

@torch.no_grad()
def encode_local_features(
    reranker: IMRAMModel, processor: Any, view: Any, batch_size: int = 128, device: Any = None, progress_bar: bool = False
) -> tuple[LocalFeatures, LocalFeatures]:
    """IMRAM local features of every image and caption of a split (one process)."""
    from .data import make_eval_transform

    device = device or next(reranker.parameters()).device
    was_training = reranker.training
    reranker.eval()
    transform = make_eval_transform(processor)
    images, texts = [], []
    try:
        for start in tqdm(range(0, view.num_images, batch_size), desc="IMRAM images", disable=not progress_bar):
            batch = transform(view.images[start : start + batch_size])
            images.append(reranker.encode_images(torch.stack(batch["pixel_values"]).to(device)))
        captions = view.captions.select_columns(["caption"])
        max_length = getattr(processor.tokenizer, "model_max_length", None)
        for start in tqdm(range(0, view.num_captions, batch_size), desc="IMRAM captions", disable=not progress_bar):
            encoded = processor(text=captions[start : start + batch_size]["caption"], return_tensors="pt", padding=True,
                                truncation=True, max_length=max_length if max_length and max_length < 10**6 else None)
            texts.append(reranker.encode_texts(encoded["input_ids"].to(device), encoded["attention_mask"].to(device)))
    finally:
        reranker.train(was_training)
    return concat_local_features(images), concat_local_features(texts)


def first_stage_scores(model: Any, image_embeds: ProbabilisticEmbedding, text_embeds: ProbabilisticEmbedding,
                       scorer: str, seed: int = 0, num_samples: int = 7) -> torch.Tensor:
    """The dual encoder's ``(N_img, N_txt)`` ranking scores (the scorer the metrics use)."""
    from .metrics.scorers import build_scorer

    source = build_scorer(
        scorer, image_embeds=image_embeds.mean, text_embeds=text_embeds.mean, image_log_sigma2=image_embeds.log_sigma2,
        text_log_sigma2=text_embeds.log_sigma2, image_samples=image_embeds.samples, text_samples=text_embeds.samples,
        num_samples=num_samples, negative_scale=model.negative_scale.detach().float(), shift=model.shift.detach().float(),
        seed=seed,
    )
    return source.image_rows(slice(0, source.num_images)).float().clone()


def reranked_matrices(first_stage: torch.Tensor, reranker: IMRAMModel, images: LocalFeatures, texts: LocalFeatures,
                      rerank_top_k: int, fusion_weight: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(i2t, t2i)`` score matrices ``(N_img, N_txt)``: image rows re-ranked, and caption columns re-ranked.

    ``fusion_weight`` (default: the re-ranker's ``config.fusion_weight``) mixes the two stages' scores.
    """
    weight = reranker.config.fusion_weight if fusion_weight is None else fusion_weight
    i2t = rerank(first_stage, rerank_top_k, lambda c: candidate_scores(reranker, images, texts, c, True), weight)
    t2i = rerank(first_stage.t(), rerank_top_k, lambda c: candidate_scores(reranker, images, texts, c, False), weight).t()
    return i2t, t2i


@torch.no_grad()
def select_fusion_weight(first_stage: torch.Tensor, reranker: IMRAMModel, images: LocalFeatures, texts: LocalFeatures,
                         view: Any, rerank_top_k: int = 50, grid: tuple[float, ...] = FUSION_WEIGHT_GRID,
                         ) -> tuple[float, list[dict[str, float]]]:
    """The fusion weight of ``grid`` with the largest ``i2t_R@1 + t2i_R@1`` on ``view`` (a validation split).

    The re-ranker scores each direction's candidates once; every weight re-orders them. Ties go to the
    smaller weight (closer to the first stage). Returns ``(weight, rows)``, one row of metrics (percent,
    with ``fusion_weight``) per weight.
    """
    top_k = min(check_rerank_top_k(rerank_top_k), first_stage.shape[1], first_stage.shape[0])
    i2t_candidates = first_stage.topk(top_k, dim=1).indices
    i2t_scores = candidate_scores(reranker, images, texts, i2t_candidates, True)
    first_t = first_stage.t()
    t2i_candidates = first_t.topk(top_k, dim=1).indices
    t2i_scores = candidate_scores(reranker, images, texts, t2i_candidates, False)
    rows = []
    for weight in grid:
        fused_i2t = fuse_scores(first_stage.gather(1, i2t_candidates), i2t_scores, weight)
        fused_t2i = fuse_scores(first_t.gather(1, t2i_candidates), t2i_scores, weight)
        i2t = rerank_score_matrix(first_stage, i2t_candidates, fused_i2t)
        t2i = rerank_score_matrix(first_t, t2i_candidates, fused_t2i).t()
        rows.append({"fusion_weight": float(weight), **metrics_from_matrices(view, i2t.cpu(), t2i.cpu())})
    best = max(rows, key=lambda row: (row["i2t_R@1"] + row["t2i_R@1"], -row["fusion_weight"]))
    return best["fusion_weight"], rows


def metrics_from_matrices(view: Any, i2t: torch.Tensor, t2i: torch.Tensor, protocol: str | None = None,
                          caption_rows: Any = None) -> dict[str, float]:
    """Retrieval metrics (percent): ``i2t_*`` keys from ``i2t``, ``t2i_*`` from ``t2i``, ``rsum`` recomputed."""
    from .metrics import evaluate_retrieval

    text_to_image, plausibility = view.text_to_image, view.plausibility
    if caption_rows is not None:
        caption_rows = np.asarray(caption_rows, dtype=np.int64)
        i2t, t2i = i2t[:, caption_rows], t2i[:, caption_rows]
        text_to_image = text_to_image[caption_rows]
        if plausibility is not None:
            plausibility = plausibility(np.arange(view.num_images), caption_rows)
    common = dict(text_to_image=text_to_image, image_labels=view.image_labels, image_classes=view.image_classes,
                  plausibility=plausibility, protocol=protocol)
    from_i2t = evaluate_retrieval(scores=i2t, **common)
    from_t2i = evaluate_retrieval(scores=t2i, **common)
    metrics = {}
    for key in from_i2t:
        name = key.rpartition("/")[2]
        if name.startswith("i2t"):
            metrics[key] = from_i2t[key]
        elif name.startswith("t2i"):
            metrics[key] = from_t2i[key]
    for prefix in sorted({key.rpartition("/")[0] for key in metrics}):
        head = f"{prefix}/" if prefix else ""
        recalls = [metrics[f"{head}{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10) if f"{head}{d}_R@{k}" in metrics]
        metrics[f"{head}rsum"] = float(sum(recalls))
    return metrics


def load_reranker(path: str, model: Any, rerank_top_k: int) -> IMRAMModel:
    """Load an IMRAM re-ranker for ``model``; a clear ``ValueError`` if it is not one, does not fit, or K is bad."""
    from transformers import AutoConfig

    from .rerank import check_rerank_top_k

    check_rerank_top_k(rerank_top_k)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"--reranker {path!r} is not a saved model folder ({error}).") from error
    if getattr(config, "model_type", None) != "imram":
        raise ValueError(f"--reranker {path!r} is a {config.model_type!r} model; it must be an IMRAM model (model_type 'imram').")
    reranker = IMRAMModel.from_pretrained(path).eval()
    check_reranker_fits(reranker, model)
    return reranker


def rerank_metrics(model: Any, reranker: IMRAMModel, processor: Any, view: Any, image_embeds: ProbabilisticEmbedding,
                   text_embeds: ProbabilisticEmbedding, *, scorer: str, rerank_top_k: int = 50, protocol: str | None = None,
                   seed: int = 0, num_samples: int = 7, batch_size: int = 128, progress_bar: bool = False) -> dict[str, float]:
    """All retrieval metrics of ``model`` re-ranked by ``reranker`` (top ``rerank_top_k`` per query), percent."""
    check_reranker_fits(reranker, model)
    first = first_stage_scores(model, image_embeds, text_embeds, scorer, seed=seed, num_samples=num_samples)
    images, texts = encode_local_features(reranker, processor, view, batch_size, progress_bar=progress_bar)
    first = first.to(images.features.device)
    i2t, t2i = reranked_matrices(first, reranker, images, texts, rerank_top_k)
    return metrics_from_matrices(view, i2t.cpu(), t2i.cpu(), protocol=protocol)


__all__ = [
    "FUSION_WEIGHT_GRID",
    "load_reranker",
    "encode_local_features",
    "first_stage_scores",
    "metrics_from_matrices",
    "rerank_metrics",
    "reranked_matrices",
    "select_fusion_weight",
]
