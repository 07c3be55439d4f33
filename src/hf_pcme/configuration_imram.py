"""Configuration of :class:`IMRAMModel`: two towers' local features, projections, and the IMRAM matcher.

Reference: Chen, Ding, Lin, Zhao & Han, "IMRAM: Iterative Matching with Recurrent Attention Memory
for Cross-Modal Image-Text Retrieval", CVPR 2020.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from .configuration_pcme import resolve_tower_config
from .registry import lookup

#: Which directions of alignment score a pair (the paper's three variants).
IMRAM_VARIANTS = {
    "text": "Text-IMRAM: words are the queries, attending over image regions",
    "image": "Image-IMRAM: regions are the queries, attending over words",
    "full": "IMRAM: the sum of both",
}


class IMRAMConfig(PreTrainedConfig):
    r"""Configuration of an IMRAM cross-attention matcher (a re-ranker of a dual encoder's top-K).

    Args:
        vision_config / text_config: the towers (as in :class:`PCMEConfig`); their local features
            (CNN grid cells / patch tokens; token outputs) are what IMRAM aligns.
        embed_dim: size D of the common space the regions and words are projected to.
        num_steps: K, matching steps (memory updates), 1..3 in the paper.
        variant: ``"text"`` (Text-IMRAM), ``"image"`` (Image-IMRAM) or ``"full"`` (both summed).
        attention_temperature: lambda, the inverse temperature of the attention softmax (SCAN / IMRAM).
        leaky_relu_slope: negative slope of the clipping of the raw similarities (SCAN's
            ``clipped_l2norm``: LeakyReLU(0.1)); 0 gives a plain ReLU clip.
        margin: margin of the hardest-negative triplet loss (VSE++ / IMRAM: 0.2).
        max_violation: hardest negative only (``True``, VSE++) or the sum over negatives.
        hardest_negative_warmup_steps: with ``max_violation``, the first training steps that sum over the
            negatives instead (VSE++ warms up this way when the hardest-negative loss collapses early).
        mined_negatives: M, negatives per query and step drawn from the query's dual-encoder top
            ``mining_top_k`` (:mod:`hf_pcme.training.mining_imram`), added to the in-batch negatives;
            0 = in-batch negatives only. Needs a frozen vision tower and a dual encoder to mine with.
        mining_top_k: how many of the dual encoder's best non-positive items per query are mined.
        duplicate_caption_positives: training captions with the same text as a positive (the same vague
            caption of many images) are positives too, never negatives (in the batch: the same token ids;
            in the mining: the same normalised text).
        frozen_towers: the towers (``"vision"``, ``"text"``) whose weights (and BatchNorm statistics)
            stay fixed. Default both: the towers of a trained dual encoder, shared for re-ranking. The
            paper keeps its region features fixed and trains its text encoder: ``["vision"]``.
        fusion_weight: alpha in [0, 1], how a re-ranked candidate's final score mixes the two stages:
            ``(1 - alpha) z(first-stage score) + alpha z(IMRAM score)``, z-scores over the query's K
            candidates (:func:`hf_pcme.rerank.fuse_scores`). 1 = order by IMRAM alone, 0 = keep the
            first-stage order. Choose it on a validation split (``scripts/choose_fusion_weight.py``).
        dual_encoder: where the towers came from (a folder or hub id of a PCME model), informational.
        initializer_range: std of the normal initialisation of the linear layers.
    """

    model_type = "imram"

    vision_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    embed_dim: int = 256
    num_steps: int = 3
    variant: str = "full"
    attention_temperature: float = 10.0
    leaky_relu_slope: float = 0.1
    margin: float = 0.2
    max_violation: bool = True
    hardest_negative_warmup_steps: int = 0
    mined_negatives: int = 0
    mining_top_k: int = 50
    duplicate_caption_positives: bool = False
    frozen_towers: list | tuple = ("vision", "text")
    fusion_weight: float = 1.0
    dual_encoder: str | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any):
        self.vision_config = resolve_tower_config("vision_config", self.vision_config, "resnet")
        self.text_config = resolve_tower_config("text_config", self.text_config, "pcme_bigru")
        lookup(IMRAM_VARIANTS, self.variant, "variant")
        if int(self.embed_dim) < 1:
            raise ValueError(f"embed_dim must be a positive integer, got {self.embed_dim}.")
        if int(self.num_steps) < 1:
            raise ValueError(f"num_steps (K, matching steps) must be >= 1, got {self.num_steps}.")
        self.frozen_towers = list(self.frozen_towers or [])
        for name in self.frozen_towers:
            if name not in ("vision", "text"):
                raise ValueError(f"frozen_towers may list 'vision' and 'text', got {name!r}.")
        if float(self.attention_temperature) <= 0:
            raise ValueError(f"attention_temperature (lambda) must be > 0, got {self.attention_temperature}.")
        for name in ("hardest_negative_warmup_steps", "mined_negatives"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if int(self.mining_top_k) < max(1, int(self.mined_negatives)):
            raise ValueError(f"mining_top_k ({self.mining_top_k}) must be >= max(1, mined_negatives) ({self.mined_negatives}).")
        if not 0.0 <= float(self.fusion_weight) <= 1.0:
            raise ValueError(f"fusion_weight (alpha) must be in [0, 1], got {self.fusion_weight}.")
        super().__post_init__(**kwargs)


__all__ = ["IMRAMConfig", "IMRAM_VARIANTS"]
