"""Validation during training: embed the validation split on all processes, then R@K and PMRP.

Images and captions are split into contiguous shards, one per process; each process embeds its
shard and the embeddings are gathered (in process order) so every process holds the full set and
computes the same metrics.
"""

from __future__ import annotations

from typing import Any

import torch

from ..distributed import gather_embeddings
from ..outputs import ProbabilisticEmbedding
from .config import Recipe


def _concat(embeddings: list[ProbabilisticEmbedding]) -> ProbabilisticEmbedding:
    fields: dict[str, Any] = {}
    for name in ("mean", "log_sigma2", "samples"):
        parts = [getattr(e, name) for e in embeddings]
        fields[name] = torch.cat(parts) if parts and parts[0] is not None else None
    return ProbabilisticEmbedding(**fields)


def _shard(num_items: int, accelerator: Any) -> range:
    """This process's contiguous slice of ``range(num_items)`` (shards are in process order)."""
    per_process, remainder = divmod(num_items, accelerator.num_processes)
    index = accelerator.process_index
    start = index * per_process + min(index, remainder)
    return range(start, start + per_process + (1 if index < remainder else 0))


@torch.no_grad()
def encode_split(model: Any, processor: Any, view: Any, batch_size: int, accelerator: Any,
                 num_samples: int | None = None) -> tuple[ProbabilisticEmbedding, ProbabilisticEmbedding]:
    """Embeddings of every image and every caption of a :class:`~hf_pcme.data.RetrievalSplit` (gathered)."""
    from ..data import make_eval_transform

    if min(view.num_images, view.num_captions) < accelerator.num_processes:
        raise ValueError(
            f"The validation split has {view.num_images} images and {view.num_captions} captions, fewer than the "
            f"{accelerator.num_processes} processes; use a larger eval split (eval.max_images) or eval.enabled=false."
        )
    device = accelerator.device
    transform = make_eval_transform(processor)
    image_parts, text_parts = [], []
    with accelerator.autocast():
        rows = _shard(view.num_images, accelerator)
        for start in range(rows.start, rows.stop, batch_size):
            batch = transform(view.images[start : min(start + batch_size, rows.stop)])
            pixel_values = torch.stack(batch["pixel_values"]).to(device)
            image_parts.append(_detach(model.get_image_features(pixel_values, num_samples=num_samples)))
        rows = _shard(view.num_captions, accelerator)
        captions = view.captions.select_columns(["caption"])
        max_length = getattr(processor.tokenizer, "model_max_length", None)
        for start in range(rows.start, rows.stop, batch_size):
            texts = captions[start : min(start + batch_size, rows.stop)]["caption"]
            encoded = processor(text=texts, return_tensors="pt", padding=True, truncation=True,
                                max_length=max_length if max_length and max_length < 10**6 else None)
            text_parts.append(_detach(model.get_text_features(
                encoded["input_ids"].to(device), encoded["attention_mask"].to(device), num_samples=num_samples
            )))
    return gather_embeddings(_concat(image_parts)), gather_embeddings(_concat(text_parts))


def _detach(embedding: ProbabilisticEmbedding) -> ProbabilisticEmbedding:
    return ProbabilisticEmbedding(
        mean=embedding.mean.float(),
        log_sigma2=None if embedding.log_sigma2 is None else embedding.log_sigma2.float(),
        samples=None if embedding.samples is None else embedding.samples.float(),
    )


def default_scorer(model: Any) -> str:
    """How the model ranks: cosine (points), best pair (PVSE), CSD or the sampled match probability (Gaussians)."""
    config = model.config
    if config.head_type == "deterministic":
        return "cosine"
    if config.head_type == "polysemous":
        return "polysemous"
    return "csd" if config.match_function == "csd" else "sampled"


def evaluate_model(model: Any, processor: Any, dataset: Any, recipe: Recipe, accelerator: Any) -> dict[str, float]:
    """R@K, R-Precision, MAP@R, PMRP (percent, flat keys such as ``i2t_R@1``, ``t2i_pmrp``, ``rsum``).

    Ranking uses ``eval.ranking`` or the model's own score (:func:`default_scorer`); with 5,000
    COCO images the ``1k/`` keys of the 5-fold protocol are added.
    """
    from ..data import make_retrieval_split
    from ..metrics import evaluate_retrieval

    view = make_retrieval_split(dataset)
    scorer = recipe.eval.ranking or default_scorer(model)
    was_training = model.training
    model.eval()
    try:
        num_samples = recipe.eval.num_samples if scorer == "sampled" else 0
        images, texts = encode_split(model, processor, view, recipe.eval.batch_size, accelerator, num_samples)
    finally:
        model.train(was_training)
    protocol = "coco" if recipe.data.name == "coco" and view.num_images % 1000 == 0 else None
    return evaluate_retrieval(
        text_to_image=view.text_to_image,
        image_embeds=images.mean,
        text_embeds=texts.mean,
        image_log_sigma2=images.log_sigma2,
        text_log_sigma2=texts.log_sigma2,
        image_samples=images.samples,
        text_samples=texts.samples,
        scorer=scorer,
        negative_scale=model.negative_scale.detach().float(),
        shift=model.shift.detach().float(),
        image_labels=view.image_labels,
        image_classes=view.image_classes,
        plausibility=view.plausibility,
        protocol=protocol,
        seed=recipe.seed,
    )


__all__ = ["default_scorer", "encode_split", "evaluate_model"]
