"""Validation during training: embed the validation split on all processes, then R@K and PMRP.

Images and captions are split into contiguous shards, one per process; each process embeds its
shard and the embeddings are gathered (in process order) so every process holds the full set and
computes the same metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..distributed import gather_embeddings
from ..heads import MULTI_EMBEDDING_HEADS
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
                 num_samples: int | None = None, progress_bar: bool = False
                 ) -> tuple[ProbabilisticEmbedding, ProbabilisticEmbedding]:
    """Embeddings of every image and every caption of a :class:`~hf_pcme.data.RetrievalSplit` (gathered).

    ``progress_bar`` shows tqdm bars on the main process.
    """
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
        show = progress_bar and accelerator.is_local_main_process
        rows = _shard(view.num_images, accelerator)
        for start in tqdm(range(rows.start, rows.stop, batch_size), desc="Embedding images", disable=not show):
            batch = transform(view.images[start : min(start + batch_size, rows.stop)])
            pixel_values = torch.stack(batch["pixel_values"]).to(device)
            image_parts.append(_detach(model.get_image_features(pixel_values, num_samples=num_samples)))
        rows = _shard(view.num_captions, accelerator)
        captions = view.captions.select_columns(["caption"])
        max_length = getattr(processor.tokenizer, "model_max_length", None)
        for start in tqdm(range(rows.start, rows.stop, batch_size), desc="Embedding captions", disable=not show):
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
    if config.head_type in MULTI_EMBEDDING_HEADS:  # K embeddings per item
        return "polysemous"
    return "csd" if config.match_function == "csd" else "sampled"


def retrieval_metrics(
    model: Any,
    view: Any,
    image_embeds: ProbabilisticEmbedding,
    text_embeds: ProbabilisticEmbedding,
    *,
    scorer: str | None = None,
    caption_rows: Any = None,
    protocol: str | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """R@K, R-Precision, MAP@R, PMRP (percent, flat keys) from embeddings of a :class:`RetrievalSplit`.

    ``scorer`` defaults to the model's own ranking (:func:`default_scorer`); ``caption_rows``
    restricts the captions (e.g. one specificity level of shapes), keeping every image.
    """
    from ..metrics import evaluate_retrieval

    scorer = scorer or default_scorer(model)
    text_to_image = view.text_to_image
    plausibility = view.plausibility
    if caption_rows is not None:
        caption_rows = np.asarray(caption_rows, dtype=np.int64)
        text_embeds = text_embeds.select(torch.as_tensor(caption_rows, device=text_embeds.mean.device))
        text_to_image = text_to_image[caption_rows]
        if plausibility is not None:
            plausibility = plausibility(np.arange(view.num_images), caption_rows)
    return evaluate_retrieval(
        text_to_image=text_to_image,
        image_embeds=image_embeds.mean,
        text_embeds=text_embeds.mean,
        image_log_sigma2=image_embeds.log_sigma2,
        text_log_sigma2=text_embeds.log_sigma2,
        image_samples=image_embeds.samples,
        text_samples=text_embeds.samples,
        scorer=scorer,
        negative_scale=model.negative_scale.detach().float(),
        shift=model.shift.detach().float(),
        image_labels=view.image_labels,
        image_classes=view.image_classes,
        plausibility=plausibility,
        protocol=protocol,
        seed=seed,
    )


@torch.no_grad()
def encode_for_scorer(
    model: Any, processor: Any, view: Any, accelerator: Any, *, scorer: str, batch_size: int,
    num_samples: int = 7, progress_bar: bool = False,
) -> tuple[ProbabilisticEmbedding, ProbabilisticEmbedding]:
    """Embed a split in eval mode, drawing samples only when ``scorer`` is ``"sampled"``."""
    was_training = model.training
    model.eval()
    try:
        samples = num_samples if scorer == "sampled" else 0
        return encode_split(model, processor, view, batch_size, accelerator, samples, progress_bar=progress_bar)
    finally:
        model.train(was_training)


def evaluate_model(model: Any, processor: Any, dataset: Any, recipe: Recipe, accelerator: Any) -> dict[str, float]:
    """R@K, R-Precision, MAP@R, PMRP (percent, flat keys such as ``i2t_R@1``, ``t2i_pmrp``, ``rsum``).

    Ranking uses ``eval.ranking`` or the model's own score (:func:`default_scorer`); with 5,000
    COCO images the ``1k/`` keys of the 5-fold protocol are added.
    """
    from ..data import make_retrieval_split

    view = make_retrieval_split(dataset)
    scorer = recipe.eval.ranking or default_scorer(model)
    images, texts = encode_for_scorer(
        model, processor, view, accelerator, scorer=scorer, batch_size=recipe.eval.batch_size,
        num_samples=recipe.eval.num_samples,
    )
    return retrieval_metrics(
        model, view, images, texts, scorer=scorer, protocol=coco_protocol(recipe.data.name, view), seed=recipe.seed
    )


def coco_protocol(dataset_name: str, view: Any) -> str | None:
    """``"coco"`` (adds the 5-fold 1K keys) for COCO splits made of whole 1,000-image folds, else ``None``."""
    return "coco" if dataset_name == "coco" and view.num_images % 1000 == 0 else None


__all__ = ["coco_protocol", "default_scorer", "encode_for_scorer", "encode_split", "evaluate_model", "retrieval_metrics"]
