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
    empty = ProbabilisticEmbedding(mean=torch.empty(0, device=device))
    images = _concat(image_parts) if image_parts else empty
    texts = _concat(text_parts) if text_parts else empty
    return gather_embeddings(images), gather_embeddings(texts)


def _detach(embedding: ProbabilisticEmbedding) -> ProbabilisticEmbedding:
    return ProbabilisticEmbedding(
        mean=embedding.mean.float(),
        log_sigma2=None if embedding.log_sigma2 is None else embedding.log_sigma2.float(),
        samples=None if embedding.samples is None else embedding.samples.float(),
    )


def evaluate_model(model: Any, processor: Any, dataset: Any, recipe: Recipe, accelerator: Any) -> dict[str, float]:
    """R@K / PMRP (percent, flat keys such as ``i2t_R@1``, ``t2i_pmrp``, ``rsum``) of ``model`` on ``dataset``."""
    from ..data import make_retrieval_split
    from ..metrics import evaluate_retrieval

    view = make_retrieval_split(dataset)
    was_training = model.training
    model.eval()
    try:
        image_embeds, text_embeds = encode_split(
            model, processor, view, recipe.eval.batch_size, accelerator, recipe.eval.num_samples
        )
        scores = model.pairwise_logits(image_embeds, text_embeds).float()
    finally:
        model.train(was_training)
    return evaluate_retrieval(scores, view)


__all__ = ["encode_split", "evaluate_model"]
