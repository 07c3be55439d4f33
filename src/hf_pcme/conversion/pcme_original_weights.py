"""The weights of an original PCME checkpoint: its architecture, and the mapping onto :class:`PCMEModel` tensors.

Part of :mod:`hf_pcme.conversion.pcme_original` (which re-exports every public name here); the
module docstring there describes the original architecture and the ``logsigma`` -> ``log_sigma2`` doubling.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .pcme_original_inputs import SPECIAL_TOKENS, ConversionError

#: torchvision ResNets: stage depths and block type.
TORCHVISION_RESNETS = {
    "resnet18": ([2, 2, 2, 2], "basic"),
    "resnet34": ([3, 4, 6, 3], "basic"),
    "resnet50": ([3, 4, 6, 3], "bottleneck"),
    "resnet101": ([3, 4, 23, 3], "bottleneck"),
    "resnet152": ([3, 8, 36, 3], "bottleneck"),
}
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass
class OriginalArchitecture:
    """What the state dict says about the original model (checked against its config)."""

    depths: list[int]
    block: str  # "basic" | "bottleneck"
    embedding_size: int
    hidden_sizes: list[int]
    cnn_dim: int
    embed_dim: int
    vocab_size: int
    word_dim: int


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(key.startswith("module.") for key in state):  # saved from DataParallel
        return {key[len("module."):]: value for key, value in state.items()}
    return dict(state)


def infer_architecture(state: Mapping[str, torch.Tensor], model_config: Mapping[str, Any]) -> OriginalArchitecture:
    """Read the ResNet layout and sizes from the state dict; fail on anything that is not PCME."""
    for flag in ("img_attention", "txt_attention", "img_probemb", "txt_probemb"):
        if model_config.get(flag) is False:
            raise ConversionError(
                f"config model.{flag} is false: this converter handles PCME checkpoints (attention and probabilistic "
                "embeddings on both sides)."
            )
    required = ["img_enc.fc.weight", "img_enc.cnn.conv1.weight", "img_enc.pie_net.attention.w_1.weight",
                "img_enc.uncertain_net.fc2.weight", "txt_enc.embed.weight", "txt_enc.rnn.weight_ih_l0",
                "txt_enc.pie_net.fc.weight", "txt_enc.uncertain_net.rnn.weight_ih_l0"]  # fmt: skip
    missing = [key for key in required if key not in state]
    if missing:
        foreign = sorted({".".join(key.split(".")[:3]) for key in state})[:6]
        raise ConversionError(
            f"Not an original PCME checkpoint (ResNet + PIE + uncertainty modules, bi-GRU captions): it lacks "
            f"{missing[:4]}; its keys start with {foreign}."
        )
    cnn_type = str(model_config.get("cnn_type", ""))
    if cnn_type and not cnn_type.startswith("resnet"):
        raise ConversionError(f"config model.cnn_type is {cnn_type!r}; only torchvision ResNets are supported.")
    depths = []
    stage = 1
    while f"img_enc.cnn.layer{stage}.0.conv1.weight" in state:
        blocks = 0
        while f"img_enc.cnn.layer{stage}.{blocks}.conv1.weight" in state:
            blocks += 1
        depths.append(blocks)
        stage += 1
    if len(depths) != 4:
        raise ConversionError(f"img_enc.cnn has {len(depths)} ResNet stages (layer1..layerN); a ResNet has 4.")
    block = "bottleneck" if "img_enc.cnn.layer1.0.conv3.weight" in state else "basic"
    last_conv = "conv3" if block == "bottleneck" else "conv2"
    hidden_sizes = [int(state[f"img_enc.cnn.layer{s}.0.{last_conv}.weight"].shape[0]) for s in range(1, 5)]
    if cnn_type in TORCHVISION_RESNETS and TORCHVISION_RESNETS[cnn_type] != (depths, block):
        raise ConversionError(
            f"config model.cnn_type is {cnn_type!r} ({TORCHVISION_RESNETS[cnn_type]}), but the checkpoint's ResNet has "
            f"stages {depths} of {block} blocks: the config does not belong to this checkpoint."
        )
    embed_dim = int(state["img_enc.fc.weight"].shape[0])
    if "embed_dim" in model_config and int(model_config["embed_dim"]) != embed_dim:
        raise ConversionError(
            f"config model.embed_dim is {model_config['embed_dim']} but img_enc.fc.weight has shape "
            f"{tuple(state['img_enc.fc.weight'].shape)}: the config does not belong to this checkpoint."
        )
    vocab_size, word_dim = (int(n) for n in state["txt_enc.embed.weight"].shape)
    return OriginalArchitecture(
        depths=depths, block=block, embedding_size=int(state["img_enc.cnn.conv1.weight"].shape[0]),
        hidden_sizes=hidden_sizes, cnn_dim=hidden_sizes[-1], embed_dim=embed_dim, vocab_size=vocab_size,
        word_dim=word_dim,
    )  # fmt: skip


def check_vocabulary(word2idx: Mapping[str, int], arch: OriginalArchitecture) -> None:
    """The vocabulary must index exactly the rows of ``txt_enc.embed.weight`` and hold the special tokens."""
    ids = sorted(word2idx.values())
    if len(word2idx) != arch.vocab_size or ids != list(range(arch.vocab_size)):
        raise ConversionError(
            f"The vocabulary does not fit the embedding matrix: it has {len(word2idx)} words with ids "
            f"{ids[0] if ids else None}..{ids[-1] if ids else None}, but txt_enc.embed.weight has {arch.vocab_size} rows. "
            "Pass the vocabulary the checkpoint was trained with (coco_vocab.pkl for COCO, cub_vocab.pkl for CUB)."
        )
    missing = [token for token in SPECIAL_TOKENS.values() if token not in word2idx]
    if missing:
        raise ConversionError(f"The vocabulary lacks the special tokens {missing} of the original code.")


def _resnet_key(key: str) -> str | None:
    """torchvision ResNet key (after ``img_enc.cnn.``) -> transformers ``ResNetModel`` key."""
    if key.startswith("conv1."):
        return "embedder.embedder.convolution." + key[len("conv1."):]
    if key.startswith("bn1."):
        return "embedder.embedder.normalization." + key[len("bn1."):]
    match = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn)(\d)\.(.+)", key)
    if match:
        stage, block, kind, index, rest = match.groups()
        module = "convolution" if kind == "conv" else "normalization"
        return f"encoder.stages.{int(stage) - 1}.layers.{block}.layer.{int(index) - 1}.{module}.{rest}"
    match = re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.([01])\.(.+)", key)
    if match:
        stage, block, index, rest = match.groups()
        module = "convolution" if index == "0" else "normalization"
        return f"encoder.stages.{int(stage) - 1}.layers.{block}.shortcut.{module}.{rest}"
    return None


class _StateMapper:
    """Copies tensors of the original state dict to new keys, remembering which original keys were used."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state
        self.out: dict[str, torch.Tensor] = {}
        self.sources: dict[str, str] = {}
        self.used: set[str] = set()

    def take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise ConversionError(f"The checkpoint lacks {key}, which every original PCME model has.")
        self.used.add(key)
        tensor = self.state[key]
        return tensor.detach().float() if tensor.is_floating_point() else tensor.detach()

    def put(self, target: str, *keys: str, combine: Callable[..., torch.Tensor] = lambda *tensors: tensors[0]) -> None:
        """``out[target] = combine(state[key] for key in keys)``; the tensors must share one shape."""
        tensors = [self.take(key) for key in keys]
        if any(t.shape != tensors[0].shape for t in tensors):
            shapes = ", ".join(f"{key} {tuple(t.shape)}" for key, t in zip(keys, tensors))
            raise ConversionError(f"Shape mismatch: {shapes} are added into {target} and must have one shape.")
        self.out[target] = combine(*tensors)
        self.sources[target] = " + ".join(keys)

    def unmapped(self) -> list[str]:
        return sorted(set(self.state) - self.used)


def _double_sum(*tensors: torch.Tensor) -> torch.Tensor:
    # log_sigma2 = 2 * logsigma: doubling weights and biases is exact in binary floating point
    return 2 * sum(tensors[1:], tensors[0])


def convert_state_dict(
    state: Mapping[str, torch.Tensor], arch: OriginalArchitecture
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Original state dict -> (``PCMEModel`` tensors without ``negative_scale`` / ``shift``, their sources).

    ``sources`` maps each new key to the original key(s) it comes from (for error messages).
    Raises :class:`ConversionError` naming any original key that nothing maps.
    """
    mapper = _StateMapper(_strip_prefix(state))
    _map_resnet(mapper)
    _map_heads(mapper)
    _map_text_tower(mapper, arch.embed_dim)
    unmapped = mapper.unmapped()
    if unmapped:
        raise ConversionError(
            f"{len(unmapped)} tensors of the checkpoint are not mapped to the converted model: {unmapped[:8]}. "
            "It is not an original PCME checkpoint, or a variant this converter does not know."
        )
    return mapper.out, mapper.sources


def _map_resnet(mapper: _StateMapper) -> None:
    """torchvision ResNet ``img_enc.cnn.*`` -> transformers ``ResNetModel`` ``vision_model.*``."""
    for key in list(mapper.state):
        if key.startswith("img_enc.cnn."):
            target = _resnet_key(key[len("img_enc.cnn."):])
            if target is not None:
                mapper.put("vision_model." + target, key)


def _map_heads(mapper: _StateMapper) -> None:
    """PIE (mean) and uncertainty modules of both sides -> the two ``ProbabilisticHead`` s (log-sigma parts doubled)."""
    put = mapper.put
    for side, head in (("img_enc", "image_head"), ("txt_enc", "text_head")):
        pie, unc = f"{side}.pie_net", f"{side}.uncertain_net"
        mean, branch = f"{head}.mean_branch", f"{head}.uncertainty_branch"
        put(f"{mean}.attention.w1.weight", f"{pie}.attention.w_1.weight")
        put(f"{mean}.attention.w2.weight", f"{pie}.attention.w_2.weight")
        put(f"{mean}.local_proj.weight", f"{pie}.fc.weight")
        put(f"{mean}.local_proj.bias", f"{pie}.fc.bias")
        put(f"{mean}.layer_norm.weight", f"{pie}.layer_norm.weight")
        put(f"{mean}.layer_norm.bias", f"{pie}.layer_norm.bias")
        put(f"{branch}.attention.w1.weight", f"{unc}.attention.w_1.weight")
        put(f"{branch}.attention.w2.weight", f"{unc}.attention.w_2.weight")
        put(f"{branch}.local_proj.weight", f"{unc}.fc.weight", combine=_double_sum)
    # image: g = fc(avgpool) for the mean; the uncertainty adds fc2(avgpool)
    put("image_head.mean_branch.global_proj.weight", "img_enc.fc.weight")
    put("image_head.mean_branch.global_proj.bias", "img_enc.fc.bias")
    put("image_head.uncertainty_branch.global_proj.weight", "img_enc.uncertain_net.fc2.weight", combine=_double_sum)
    put("image_head.uncertainty_branch.bias", "img_enc.uncertain_net.fc.bias", "img_enc.uncertain_net.fc2.bias",
        combine=_double_sum)  # fmt: skip


def _map_text_tower(mapper: _StateMapper, embed_dim: int) -> None:
    """Word embeddings and the two bi-GRUs -> ``text_model``; the text heads' global projections as identity blocks."""
    # text: the tower's global feature is [sentence GRU, uncertainty GRU] (2D); the mean reads the first
    # half unprojected, log_sigma2 twice the second half (identity blocks: exact)
    d = embed_dim
    eye, zeros = torch.eye(d), torch.zeros(d, d)
    mapper.out["text_head.mean_branch.global_proj.weight"] = torch.cat([eye, zeros], dim=1)
    mapper.out["text_head.mean_branch.global_proj.bias"] = torch.zeros(d)
    mapper.out["text_head.uncertainty_branch.global_proj.weight"] = torch.cat([zeros, 2 * eye], dim=1)
    for key in ("text_head.mean_branch.global_proj.weight", "text_head.mean_branch.global_proj.bias",
                "text_head.uncertainty_branch.global_proj.weight"):  # fmt: skip
        mapper.sources[key] = f"identity blocks of size img_enc.fc.weight.shape[0] = {d}"
    mapper.put("text_head.uncertainty_branch.bias", "txt_enc.uncertain_net.fc.bias", combine=_double_sum)
    mapper.put("text_model.word_embeddings.weight", "txt_enc.embed.weight")
    for source, target in (("txt_enc.rnn", "text_model.gru"), ("txt_enc.uncertain_net.rnn", "text_model.uncertainty_gru")):
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            for suffix in ("", "_reverse"):
                mapper.put(f"{target}.{name}{suffix}", f"{source}.{name}{suffix}")


def load_into_model(model: torch.nn.Module, converted: Mapping[str, torch.Tensor], source_of: Mapping[str, str]) -> None:
    """Copy ``converted`` into ``model``; every model tensor must be given with its exact shape."""
    target = model.state_dict()
    expected = {key for key in target if key not in ("negative_scale", "shift")}
    missing = sorted(expected - set(converted))
    if missing:
        raise ConversionError(f"The converted model would leave {len(missing)} tensors unset: {missing[:8]}.")
    extra = sorted(set(converted) - set(target))
    if extra:
        raise ConversionError(f"Converted tensors with no place in PCMEModel: {extra[:8]}.")
    for key, value in converted.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise ConversionError(
                f"Shape mismatch: {source_of.get(key, key)} of the checkpoint has shape {tuple(value.shape)}, "
                f"but {key} of PCMEModel has {tuple(target[key].shape)}."
            )
    model.load_state_dict({**target, **converted}, strict=True)


__all__ = [
    "BN_SUFFIXES",
    "TORCHVISION_RESNETS",
    "OriginalArchitecture",
    "check_vocabulary",
    "convert_state_dict",
    "infer_architecture",
    "load_into_model",
]
