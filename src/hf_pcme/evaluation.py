"""Evaluate a saved model on a retrieval split: embed every image and caption, then R@K, PMRP, ...

    from hf_pcme.evaluation import default_scorer, encode_for_scorer, retrieval_metrics
    images, texts = encode_for_scorer(model, processor, view, accelerator, scorer=scorer, batch_size=128)
    metrics = retrieval_metrics(model, view, images, texts, scorer=scorer)

Nothing here imports ``hf_pcme.training``: ``scripts/evaluate.py`` and the main job use this module
directly, and training's validation (``hf_pcme.training.evaluation``) builds on it.

Images and captions are split into contiguous shards, one per process; each process embeds its
shard and the embeddings are gathered (in process order) so every process holds the full set and
computes the same metrics. Embedding draws no samples: for the sampled match probability (PCME)
:func:`retrieval_metrics` draws them once for the whole split from generators seeded by the
model's ``config.inference_seed`` (or ``seed=``), so the metrics are a function of the model, the
split and the seed, whatever the batch size or the number of processes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .distributed import gather_embeddings
from .outputs import ProbabilisticEmbedding
from .scoring import default_score

#: The model-index task of retrieval results (model cards, ``scripts/evaluate.py --update-card``).
TASK_TYPE = "cross-modal-retrieval"
TASK_NAME = "Cross-modal retrieval"

_METRIC_NAMES = {"map_at_r": "MAP@R", "r_precision": "R-Precision", "pmrp": "PMRP", "rsum": "RSUM"}


def metric_display_name(key: str) -> str:
    """``"i2t_R@1"`` -> ``"i2t R@1"``, ``"t2i_pmrp_zeta1"`` -> ``"t2i PMRP (zeta=1)"``, ``"1k/rsum"`` -> ``"RSUM (1K)"``."""
    protocol, _, key = key.rpartition("/")
    suffix = f" ({protocol.upper()})" if protocol else ""
    direction, _, name = key.partition("_")
    if direction not in ("i2t", "t2i") or not name:
        direction, name = "", key
    zeta = ""
    if "_zeta" in name:
        name, _, value = name.partition("_zeta")
        zeta = f" (zeta={value})"
    pretty = _METRIC_NAMES.get(name.lower(), name)
    return " ".join(filter(None, (direction, pretty))) + zeta + suffix


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

    ``num_samples`` is passed to the model (``None``: ``config.num_samples``; 0: no samples).
    ``progress_bar`` shows tqdm bars on the main process when it writes to a terminal.
    """
    from .data import make_eval_transform

    if min(view.num_images, view.num_captions) < accelerator.num_processes:
        raise ValueError(
            f"The validation split has {view.num_images} images and {view.num_captions} captions, fewer than the "
            f"{accelerator.num_processes} processes; use a larger eval split (eval.max_images) or eval.enabled=false."
        )
    device = accelerator.device
    transform = make_eval_transform(processor)
    image_parts, text_parts = [], []
    with accelerator.autocast():
        # disable=None: no bars when the output is not a terminal (logs stay small)
        disable = None if (progress_bar and accelerator.is_local_main_process) else True
        rows = _shard(view.num_images, accelerator)
        for start in tqdm(range(rows.start, rows.stop, batch_size), desc="Embedding images", disable=disable):
            batch = transform(view.images[start : min(start + batch_size, rows.stop)])
            pixel_values = torch.stack(batch["pixel_values"]).to(device)
            image_parts.append(_detach(model.get_image_features(pixel_values, num_samples=num_samples)))
        rows = _shard(view.num_captions, accelerator)
        captions = view.captions.select_columns(["caption"])
        max_length = getattr(processor.tokenizer, "model_max_length", None)
        for start in tqdm(range(rows.start, rows.stop, batch_size), desc="Embedding captions", disable=disable):
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
    """How the model ranks: ``hf_pcme.scoring.default_score(model.config)`` (cosine for points, best
    pair for PVSE, CSD or the sampled match probability for Gaussians)."""
    return default_score(model.config)


def retrieval_metrics(
    model: Any,
    view: Any,
    image_embeds: ProbabilisticEmbedding,
    text_embeds: ProbabilisticEmbedding,
    *,
    scorer: str | None = None,
    caption_rows: Any = None,
    protocol: str | None = None,
    seed: int | None = None,
    num_samples: int | None = None,
    image_ids: Any = None,
    text_ids: Any = None,
) -> dict[str, float]:
    """R@K, R-Precision, MAP@R, PMRP (percent, flat keys) from embeddings of a :class:`RetrievalSplit`.

    ``image_ids`` / ``text_ids`` (COCO image / caption annotation ids) are needed by
    ``protocol="eccv_caption"`` / ``"cxc"``.

    ``scorer`` defaults to the model's own ranking (:func:`default_scorer`); ``caption_rows``
    restricts the captions (e.g. one specificity level of shapes), keeping every image. For
    ``scorer="sampled"`` embeddings without samples get ``num_samples`` (default
    ``config.num_samples``) per item, drawn from generators seeded by ``seed`` (default
    ``config.inference_seed``, else 0): ``2 * seed`` for the images, ``2 * seed + 1`` for the captions.
    """
    from .metrics import evaluate_retrieval

    text_to_image = view.text_to_image
    plausibility = view.plausibility
    if caption_rows is not None:
        caption_rows = np.asarray(caption_rows, dtype=np.int64)
        text_embeds = text_embeds.select(torch.as_tensor(caption_rows, device=text_embeds.mean.device))
        text_to_image = text_to_image[caption_rows]
        if plausibility is not None:
            plausibility = plausibility(np.arange(view.num_images), caption_rows)
    inputs = retrieval_inputs(model, view, image_embeds, text_embeds, scorer=scorer, seed=seed, num_samples=num_samples)
    inputs.update(text_to_image=text_to_image, plausibility=plausibility)
    return evaluate_retrieval(**inputs, protocol=protocol, image_ids=image_ids, text_ids=text_ids)


def retrieval_inputs(
    model: Any,
    view: Any,
    image_embeds: ProbabilisticEmbedding,
    text_embeds: ProbabilisticEmbedding,
    *,
    scorer: str | None = None,
    seed: int | None = None,
    num_samples: int | None = None,
) -> dict[str, Any]:
    """The keyword arguments of :func:`hf_pcme.metrics.evaluate_retrieval` for a model's embeddings of a split.

    The model's own score (:func:`default_scorer`) unless ``scorer`` is given, its ``a`` and ``b``,
    the split's relevance (pairs, labels, classes, plausibility), and for sampled scores ``seed``
    (default ``config.inference_seed``, else 0) and ``num_samples`` (default ``config.num_samples``).
    """
    config = model.config
    if seed is None:
        seed = getattr(config, "inference_seed", None)
        seed = 0 if seed is None else seed
    if num_samples is None:
        num_samples = getattr(config, "num_samples", 7)
    return dict(
        text_to_image=view.text_to_image,
        image_embeds=image_embeds.mean,
        text_embeds=text_embeds.mean,
        image_log_sigma2=image_embeds.log_sigma2,
        text_log_sigma2=text_embeds.log_sigma2,
        image_samples=image_embeds.samples,
        text_samples=text_embeds.samples,
        scorer=scorer or default_scorer(model),
        negative_scale=model.negative_scale.detach().float(),
        shift=model.shift.detach().float(),
        image_labels=view.image_labels,
        image_classes=view.image_classes,
        plausibility=view.plausibility,
        num_samples=num_samples,
        seed=seed,
    )


@torch.no_grad()
def encode_for_scorer(
    model: Any, processor: Any, view: Any, accelerator: Any, *, scorer: str | None = None, batch_size: int,
    num_samples: int | None = None, progress_bar: bool = False,
) -> tuple[ProbabilisticEmbedding, ProbabilisticEmbedding]:
    """Embed a split in eval mode: means and log variances, no samples.

    Whatever ``scorer`` (kept for callers that pass it), samples for the sampled match probability
    are drawn later by :func:`retrieval_metrics` for the whole split at once (pass ``num_samples``
    there), so they do not depend on the batch size or the number of processes.
    """
    del scorer, num_samples
    was_training = model.training
    model.eval()
    try:
        return encode_split(model, processor, view, batch_size, accelerator, 0, progress_bar=progress_bar)
    finally:
        model.train(was_training)


def coco_protocol(dataset_name: str, view: Any) -> str | None:
    """``"coco"`` (adds the 5-fold 1K keys) for COCO splits made of whole 1,000-image folds, else ``None``."""
    return "coco" if dataset_name == "coco" and view.num_images % 1000 == 0 else None


__all__ = [
    "TASK_NAME",
    "TASK_TYPE",
    "coco_protocol",
    "default_scorer",
    "encode_for_scorer",
    "encode_split",
    "metric_display_name",
    "retrieval_metrics",
]
