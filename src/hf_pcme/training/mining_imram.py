"""Hard negatives for IMRAM training, mined by the frozen dual encoder whose top-K IMRAM re-ranks.

At test time IMRAM only sees each query's first-stage top-K, so the negatives that matter are the
items the dual encoder ranks high. Before training, the dual encoder scores every training image
with every training caption (its own ranking score, e.g. PCME's sampled match probability), and
each query keeps its top ``mining_top_k`` items that are not positives:

- image i -> captions: the highest-scored captions c whose text is not the text of one of i's own
  captions (duplicate-aware: an identical caption of another image, e.g. the same vague "some
  shapes", is a correct description of i, not a negative);
- caption c -> images: the highest-scored images that have no caption with c's text.

"Text" is the caption normalised by :func:`normalise_caption` (case, spacing, final period). During
training, :class:`~hf_pcme.training.module_imram.IMRAMTrainingModule` draws ``mined_negatives`` of
each query's list per step and adds them to the in-batch negatives of the triplet loss.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: Mined negatives of the models being trained (set by :func:`attach_mined_negatives`).
_NEGATIVES: "weakref.WeakKeyDictionary[Any, MinedNegatives]" = weakref.WeakKeyDictionary()


def normalise_caption(text: str) -> str:
    """Lower case, single spaces, no final period: the identity under which two captions are duplicates."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(" .")


def caption_text_ids(captions: list[str]) -> np.ndarray:
    """``(N,)`` int64: equal for captions with the same :func:`normalise_caption` text."""
    _, inverse = np.unique([normalise_caption(text) for text in captions], return_inverse=True)
    return inverse.reshape(-1).astype(np.int64)


def duplicate_aware_positives(text_to_image: np.ndarray, text_ids: np.ndarray, num_images: int) -> torch.Tensor:
    """``(N_img, N_cap)`` bool: caption c is a positive of image i iff i has a caption with c's text."""
    text_to_image, text_ids = np.asarray(text_to_image), np.asarray(text_ids)
    has_text = np.zeros((num_images, int(text_ids.max()) + 1 if len(text_ids) else 0), dtype=bool)
    has_text[text_to_image, text_ids] = True
    return torch.from_numpy(has_text[:, text_ids])


def mine_negatives(
    scores: torch.Tensor, positive_mask: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's ``top_k`` highest-scored non-positive items of ``scores (N_img, N_cap)`` (higher = better).

    Returns ``(image_to_captions (N_img, k), caption_to_images (N_cap, k))`` as indices, best first;
    ``k = min(top_k, N)``, rows with fewer than ``k`` negatives are padded with ``-1``.
    """
    if scores.shape != positive_mask.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positive_mask {tuple(positive_mask.shape)} differ in shape.")
    if top_k < 1:
        raise ValueError(f"mining_top_k must be >= 1, got {top_k}.")
    masked = scores.float().masked_fill(positive_mask.bool(), -torch.inf)

    def top(matrix: torch.Tensor) -> torch.Tensor:
        values, indices = matrix.topk(min(top_k, matrix.shape[1]), dim=1)
        return indices.masked_fill(values == -torch.inf, -1)

    return top(masked), top(masked.t())


@dataclass
class MinedNegatives:
    """What the training module needs to score mined negatives without the dataset.

    Attributes:
        image_ids / caption_ids: the training split's ids (``image_id`` / ``caption_id``), sorted,
            with ``image_rows`` / ``caption_rows`` their rows in the tables below.
        image_to_captions: ``(N_img, K)`` caption rows, the mined negatives of each image (-1 = none).
        caption_to_images: ``(N_cap, K)`` image rows, the mined negatives of each caption.
        region_features: ``(N_img, R, C)`` the frozen vision tower's local features (before IMRAM's projection).
        input_ids / attention_mask: ``(N_cap, L)`` the tokenised captions.
    """

    image_ids: np.ndarray
    image_rows: np.ndarray
    caption_ids: np.ndarray
    caption_rows: np.ndarray
    image_to_captions: torch.Tensor
    caption_to_images: torch.Tensor
    region_features: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @staticmethod
    def _rows(sorted_ids: np.ndarray, rows: np.ndarray, ids: torch.Tensor, what: str) -> torch.Tensor:
        wanted = ids.detach().cpu().numpy()
        positions = np.searchsorted(sorted_ids, wanted).clip(max=len(sorted_ids) - 1)
        if (sorted_ids[positions] != wanted).any():
            raise KeyError(f"{what} {wanted[sorted_ids[positions] != wanted][:5].tolist()} are not in the mined training split.")
        return torch.from_numpy(rows[positions])

    def image_rows_of(self, image_ids: torch.Tensor) -> torch.Tensor:
        return self._rows(self.image_ids, self.image_rows, image_ids, "image ids")

    def caption_rows_of(self, caption_ids: torch.Tensor) -> torch.Tensor:
        return self._rows(self.caption_ids, self.caption_rows, caption_ids, "caption ids")


def attach_mined_negatives(model: Any, negatives: MinedNegatives) -> None:
    """Make ``negatives`` the mined negatives of ``model`` for :func:`mined_negatives_of` (not saved with it)."""
    _NEGATIVES[model] = negatives


def mined_negatives_of(model: Any) -> MinedNegatives | None:
    return _NEGATIVES.get(model)


def _dual_encoder_embeddings(
    dual_encoder: Any, view: Any, transform: Any, encoded: Any, device: torch.device, batch_size: int
) -> tuple[list[torch.Tensor], Any, Any]:
    """The split's pixel batches and the dual encoder's image and caption embeddings (float32, no samples)."""
    from ..outputs import ProbabilisticEmbedding

    was_training = dual_encoder.training
    dual_encoder.eval()
    pixel_batches, image_parts, text_parts = [], [], []
    for start in range(0, view.num_images, batch_size):
        pixel_batches.append(torch.stack(transform(view.images[start : start + batch_size])["pixel_values"]).to(device))
        image_parts.append(dual_encoder.get_image_features(pixel_batches[-1], num_samples=0))
    for start in range(0, view.num_captions, batch_size):
        rows = slice(start, start + batch_size)
        text_parts.append(dual_encoder.get_text_features(
            encoded["input_ids"][rows].to(device), encoded["attention_mask"][rows].to(device), num_samples=0))
    dual_encoder.train(was_training)

    def concat(parts: list[ProbabilisticEmbedding]) -> ProbabilisticEmbedding:
        has_sigma = parts[0].log_sigma2 is not None
        return ProbabilisticEmbedding(mean=torch.cat([p.mean.float() for p in parts]),
                                      log_sigma2=torch.cat([p.log_sigma2.float() for p in parts]) if has_sigma else None)

    return pixel_batches, concat(image_parts), concat(text_parts)


@torch.no_grad()
def build_mined_negatives(
    dual_encoder: Any, imram_model: Any, processor: Any, dataset: Any, top_k: int, max_caption_length: int | None = None,
    batch_size: int = 250, seed: int = 0,
) -> MinedNegatives:
    """Mine ``top_k`` negatives per query of the caption-level training ``dataset`` with ``dual_encoder``'s ranking.

    ``imram_model``'s vision tower must be frozen: its local features are computed once here.
    """
    from ..data import make_eval_transform, make_retrieval_split
    from ..data.views import column_as_numpy
    from ..evaluation import default_scorer
    from ..modeling_pcme import tower_local_and_global
    from ..rerank_evaluation import first_stage_scores

    if "vision" not in imram_model.config.frozen_towers:
        raise ValueError("mined_negatives > 0 needs a frozen vision tower (model.imram.frozen_towers: [vision, ...]): "
                         "the regions of the mined images are computed once before training.")
    view = make_retrieval_split(dataset)
    transform = make_eval_transform(processor)
    captions = list(view.captions.select_columns(["caption"])[:]["caption"])
    kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True, "truncation": True}
    if max_caption_length is not None:
        kwargs["max_length"] = max_caption_length
    encoded = processor(text=captions, **kwargs)
    device = next(imram_model.parameters()).device

    # One process, no gather: every process mines the same negatives from the whole split.
    pixel_batches, image_embeds, text_embeds = _dual_encoder_embeddings(dual_encoder, view, transform, encoded,
                                                                        device, batch_size)
    scores = first_stage_scores(dual_encoder, image_embeds, text_embeds, default_scorer(dual_encoder),
                                seed=seed, num_samples=dual_encoder.config.num_samples)
    positives = duplicate_aware_positives(view.text_to_image, caption_text_ids(captions), view.num_images)
    image_to_captions, caption_to_images = mine_negatives(scores, positives, top_k)
    del scores, positives

    regions = []
    for pixels in pixel_batches:
        local, _, _ = tower_local_and_global(imram_model.vision_model(pixel_values=pixels))
        regions.append(local.float().cpu())
    image_ids = column_as_numpy(view.images, "image_id")
    caption_ids = column_as_numpy(view.captions, "caption_id")
    image_order, caption_order = np.argsort(image_ids, kind="stable"), np.argsort(caption_ids, kind="stable")
    return MinedNegatives(
        image_ids=image_ids[image_order], image_rows=image_order, caption_ids=caption_ids[caption_order],
        caption_rows=caption_order, image_to_captions=image_to_captions, caption_to_images=caption_to_images,
        region_features=torch.cat(regions), input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
    )


__all__ = [
    "MinedNegatives",
    "attach_mined_negatives",
    "build_mined_negatives",
    "caption_text_ids",
    "duplicate_aware_positives",
    "mine_negatives",
    "mined_negatives_of",
    "normalise_caption",
]
