"""Build the :class:`~hf_pcme.IMRAMModel` of a recipe with ``model.architecture: imram``.

``model.pretrained`` names a trained dual encoder (a PCME folder or hub id): IMRAM is built on its
towers (those in ``model.imram.frozen_towers`` frozen, default both) and the recipe uses its processor, so
the re-ranker reads exactly the inputs the dual encoder reads. Without ``pretrained`` the towers are
built from the recipe as for a PCME model, and trained with IMRAM. With ``model.imram.mined_negatives``
> 0 the dual encoder also mines each training query's hard negatives before training
(:mod:`hf_pcme.training.mining_imram`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..configuration_imram import IMRAMConfig
from ..modeling_imram import IMRAMModel
from .config import Recipe


def build_imram_model(recipe: Recipe, tokenizer: Any = None) -> IMRAMModel:
    """An IMRAMModel on the towers of ``model.pretrained`` (a PCME model) or of fresh towers; ``model.imram`` = IMRAMConfig fields."""
    from ..modeling_pcme import PCMEModel
    from .builders import build_model

    options = dict(recipe.model.imram or {})
    unknown = sorted(set(options) - set(IMRAMConfig.__annotations__) - {"vision_config", "text_config"})
    unknown += sorted({"vision_config", "text_config"} & set(options))
    if unknown:
        valid = sorted(set(IMRAMConfig.__annotations__) - {"vision_config", "text_config"})
        raise ValueError(f"Unknown model.imram key(s) {', '.join(unknown)}; valid keys are: {', '.join(valid)}.")
    if recipe.model.pretrained is not None:
        dual_encoder = PCMEModel.from_pretrained(recipe.model.pretrained)
        options.setdefault("dual_encoder", recipe.model.pretrained)
    else:
        options.setdefault("frozen_towers", [])  # new towers must learn
        pcme_recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, architecture="pcme"))
        dual_encoder = build_model(pcme_recipe, tokenizer)
    model = IMRAMModel.from_dual_encoder(dual_encoder, **options)
    if model.config.mined_negatives > 0:
        if recipe.model.pretrained is None:
            raise ValueError("model.imram.mined_negatives > 0 mines negatives with a trained dual encoder: set "
                             "model.pretrained to its folder (or mined_negatives: 0).")
        from ..processing_pcme import PCMEProcessor
        from .data import load_splits
        from .mining_imram import attach_mined_negatives, build_mined_negatives

        train_split, _ = load_splits(dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, enabled=False)))
        negatives = build_mined_negatives(
            dual_encoder, model, PCMEProcessor.from_pretrained(recipe.model.pretrained), train_split,
            model.config.mining_top_k, max_caption_length=recipe.model.max_caption_length, seed=recipe.seed,
        )
        attach_mined_negatives(model, negatives)
    return model


__all__ = ["build_imram_model"]
