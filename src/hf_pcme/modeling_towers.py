"""The two towers of a dual encoder: build one from its config, load a pretrained one, read its features.

Model-side (imported by :mod:`hf_pcme.modeling_pcme` and :mod:`hf_pcme.modeling_imram`, shipped as
remote code): flat, relative imports only.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .text_encoder_pcme_original import PCMEOriginalTextModel
from .text_encoders import PCMEBiGRUModel
from .text_gcn import PCMETextGCNModel

#: Built-in towers, instantiated directly (not through ``AutoModel``) so remote code works
#: without ``hf_pcme`` being installed.
BUILTIN_TOWERS: dict[str, type[PreTrainedModel]] = {
    "pcme_bigru": PCMEBiGRUModel,
    "pcme_textgcn": PCMETextGCNModel,
    "pcme_original_text": PCMEOriginalTextModel,  # converted original PCME checkpoints
}


def build_tower(config: PreTrainedConfig) -> PreTrainedModel:
    """Instantiate a randomly initialised tower from its config (built-in or any transformers model)."""
    builtin = BUILTIN_TOWERS.get(config.model_type)
    return builtin(config) if builtin is not None else AutoModel.from_config(config)


def tower_feature_dim(config: PreTrainedConfig) -> int:
    """Channel size of a tower's ``last_hidden_state`` (CNNs: last stage width; transformers: hidden size)."""
    if getattr(config, "local_feature_size", None):  # a tower that states it (pcme_original_text)
        return int(config.local_feature_size)
    hidden_sizes = getattr(config, "hidden_sizes", None)
    if hidden_sizes:
        return int(hidden_sizes[-1])
    for name in ("hidden_size", "hidden_dim", "d_model"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError(
        f"Cannot tell the feature size of a {config.model_type!r} tower: its config has no hidden_sizes, "
        "hidden_size, hidden_dim or d_model. Wrap the backbone so its output has a known width."
    )


def tower_local_and_global(
    outputs: ModelOutput, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Local features ``(B, L, C)``, a global feature ``(B, C)`` and a padding mask ``(B, L)`` from a tower output.

    CNN grids ``(B, C, H, W)`` become ``H*W`` local features; token sequences are used as they are,
    with the text padding mask. The global feature is the tower's ``pooler_output`` when it has
    one (avg-pooled CNN feature, CLS/EOS token, bi-GRU summary), else the masked mean of the locals.
    """
    hidden = outputs.last_hidden_state
    if hidden.dim() == 4:
        local, mask = hidden.flatten(2).transpose(1, 2), None
    elif hidden.dim() == 3:
        local = hidden
        mask = attention_mask.bool() if attention_mask is not None else None
    else:
        raise ValueError(f"Tower output last_hidden_state must be (B, C, H, W) or (B, L, C), got {tuple(hidden.shape)}.")
    pooled = getattr(outputs, "pooler_output", None)
    if pooled is None or pooled.shape[0] != local.shape[0]:
        if mask is None:
            pooled = local.mean(dim=1)
        else:
            weights = mask.unsqueeze(-1).to(local.dtype)
            pooled = (local * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    pooled = pooled.flatten(1)
    return local, pooled, mask


def load_pretrained_tower(name_or_path: str | os.PathLike, **kwargs: Any) -> PreTrainedModel:
    """Load one pretrained tower (hub id or local folder): built-in towers directly, others via ``AutoModel``."""
    config_path = os.path.join(str(name_or_path), "config.json")
    if os.path.isfile(config_path):
        import json

        with open(config_path, encoding="utf-8") as handle:
            model_type = json.load(handle).get("model_type")
        if model_type in BUILTIN_TOWERS:
            return BUILTIN_TOWERS[model_type].from_pretrained(name_or_path, **kwargs)
    return AutoModel.from_pretrained(name_or_path, **kwargs)


__all__ = ["BUILTIN_TOWERS", "build_tower", "load_pretrained_tower", "tower_feature_dim", "tower_local_and_global"]
