"""Embedding a corpus of captions or images with a model, batch by batch (for the index and the pipeline).

:func:`encode_corpus` embeds a whole corpus (eval mode, no gradients, a progress bar) and gathers
the results on the CPU in float32; :func:`encode_batch` embeds one batch on the model's device;
:func:`infer_modality` tells captions from images and :func:`load_images` opens images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .distances import iter_row_chunks
from .outputs import ProbabilisticEmbedding


def infer_modality(items: Sequence[Any], name: str) -> str:
    """``"image"`` if every item is a PIL image or a ``pathlib.Path``, ``"text"`` if every item is a str.

    Raises a ``ValueError`` naming ``name`` for mixed or unsupported items.
    """
    from PIL import Image

    kinds = set()
    for item in items:
        if isinstance(item, str):
            kinds.add("text")
        elif isinstance(item, (Image.Image, Path)):
            kinds.add("image")
        else:
            raise ValueError(
                f"{name} items must be str (captions) or PIL images / pathlib.Path (images), got {type(item).__name__}."
            )
    if len(kinds) != 1:
        raise ValueError(
            f"{name} mixes captions (str) and images (PIL / Path): give one modality per call. "
            "For image paths given as str, pass the modality explicitly."
        )
    return kinds.pop()


def load_images(items: Sequence[Any]) -> list:
    """PIL images (RGB, EXIF-upright) from PIL images or local paths."""
    from transformers.image_utils import load_image

    return [load_image(str(item) if isinstance(item, Path) else item) for item in items]


def encode_batch(
    model: torch.nn.Module,
    processor: Callable[..., Any],
    items: Sequence[Any],
    modality: str,
    *,
    num_samples: int = 0,
) -> ProbabilisticEmbedding:
    """Embed one batch of captions or images with ``model`` on its own device (no gradients)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        if modality == "text":
            inputs = processor(text=list(items), padding=True, truncation=True, return_tensors="pt")
            return model.get_text_features(
                input_ids=inputs["input_ids"].to(device),
                attention_mask=inputs["attention_mask"].to(device) if "attention_mask" in inputs else None,
                num_samples=num_samples,
            )
        inputs = processor(images=load_images(items), return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(device=device, dtype=next(model.parameters()).dtype)
        return model.get_image_features(pixel_values=pixel_values, num_samples=num_samples)


def encode_corpus(
    model: torch.nn.Module,
    processor: Callable[..., Any],
    items: Sequence[Any],
    modality: str,
    *,
    batch_size: int = 32,
    return_attention: bool = False,
    progress_bar: bool = True,
) -> ProbabilisticEmbedding:
    """Embed a whole corpus in batches (with a progress bar); tensors gathered on the CPU in float32."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    was_training = model.training
    model.eval()  # dropout off: an index must not depend on the luck of a forward pass
    means, log_sigma2s, attentions = [], [], []
    try:
        for rows in tqdm(
            list(iter_row_chunks(len(items), batch_size)), desc=f"Embedding {modality} corpus", disable=None if progress_bar else True
        ):
            out = encode_batch(model, processor, items[rows], modality)
            means.append(out.mean.float().cpu())
            if out.log_sigma2 is not None:
                log_sigma2s.append(out.log_sigma2.float().cpu())
            if return_attention and out.attention is not None:
                attentions.append(out.attention.float().cpu())
    finally:
        model.train(was_training)
    return ProbabilisticEmbedding(
        mean=torch.cat(means),
        log_sigma2=torch.cat(log_sigma2s) if log_sigma2s else None,
        attention=_cat_padded(attentions) if attentions else None,
    )


def _cat_padded(attentions: list[torch.Tensor]) -> torch.Tensor:
    # Image attention maps all have the same length L; this only guards the invariant.
    lengths = {a.shape[-1] for a in attentions}
    if len(lengths) != 1:
        raise ValueError(f"Attention maps of different lengths {sorted(lengths)} cannot be stored together.")
    return torch.cat(attentions)


__all__ = ["encode_batch", "encode_corpus", "infer_modality", "load_images"]
