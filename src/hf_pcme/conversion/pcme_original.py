"""Convert a checkpoint of the original PCME code (naver-ai/pcme) into a :class:`PCMEModel` folder.

The original checkpoint (``model_best.pth``) is a ``torch.save`` dict: ``model`` (state dict),
``criterion`` (``negative_scale`` a, ``shift`` b), ``config`` (the YAML as a dict), ``word2idx``,
and optimiser / scheduler state (ignored). Its architecture (Chun et al., CVPR 2021, with the
PVSE encoders of Song & Soleymani, CVPR 2019):

- image: torchvision ResNet ``img_enc.cnn`` (7x7 grid x), ``g = img_enc.fc(avgpool(x))``;
  ``mean = l2norm(LayerNorm(g + sigmoid(pie_net.fc(attention-pooled x))))``;
  ``logsigma = uncertain_net.fc(attention'-pooled x) + uncertain_net.fc2(avgpool(x))``.
- caption: word embeddings ``w = txt_enc.embed(ids)``; ``g`` = the bi-GRU ``txt_enc.rnn`` output at
  the last real token; ``mean = l2norm(LayerNorm(g + sigmoid(pie_net.fc(attention-pooled w))))``;
  ``logsigma = uncertain_net.fc(attention'-pooled w) + (uncertain_net.rnn output at the last token)``.

The original samples ``mean + exp(logsigma) * eps``: ``logsigma`` is a log standard deviation. We
store ``log_sigma2 = 2 * logsigma`` by doubling the weights and biases that produce it (exact in
binary floating point), so samples, match probabilities and rankings are the original's. The
ResNet becomes a transformers ``ResNetModel`` (same layers, renamed); the caption tower is
:class:`~hf_pcme.text_encoder_pcme_original.PCMEOriginalTextModel`; both heads are the standard
:class:`~hf_pcme.heads.ProbabilisticHead` (the text mean head's global projection is an identity
block: the original adds the GRU output without projecting it).

Every tensor of the original state dict is mapped or the conversion fails naming it; every
tensor of the new model must be produced, with the same shape, or it fails naming both.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = {"pad": "<pad>", "start": "<start>", "end": "<end>", "unk": "<unk>"}
#: torchvision ResNets: stage depths and block type.
TORCHVISION_RESNETS = {
    "resnet18": ([2, 2, 2, 2], "basic"),
    "resnet34": ([3, 4, 6, 3], "basic"),
    "resnet50": ([3, 4, 6, 3], "bottleneck"),
    "resnet101": ([3, 4, 23, 3], "bottleneck"),
    "resnet152": ([3, 8, 36, 3], "bottleneck"),
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
VOCAB_PICKLE_WARNING = (
    "Reading the vocabulary pickle {path}. Unpickling can run code hidden in the file; only plain "
    "dicts, lists, strings and numbers are accepted here, and the result is stored as a plain "
    "tokenizer.json. Convert only files you trust."
)


class ConversionError(ValueError):
    """The checkpoint, vocabulary or config cannot be converted; the message says why."""


# ---------------------------------------------------------------------------- reading inputs
def load_original_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, Any]:
    """``torch.load`` of an original checkpoint, with ``weights_only=True`` unless ``allow_pickle``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}.")
    if not zipfile.is_zipfile(path) and not allow_pickle:
        raise ConversionError(
            f"{path} is truncated or not a torch checkpoint (no zip archive, which torch.save writes since torch 1.6). "
            "Download it again; if it is an older pickle checkpoint you trust, pass allow_pickle=True (--allow-pickle)."
        )
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):  # metadata may hold numpy scores
            checkpoint = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error) and not allow_pickle:
            raise ConversionError(
                f"{path} holds Python objects other than tensors and plain containers, which weights-only loading "
                "refuses. If you trust the file, pass allow_pickle=True (--allow-pickle)."
            ) from error
        raise ConversionError(f"{path} is truncated or not a torch checkpoint ({error}). Download it again.") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ConversionError(f"{path} is truncated or not a torch checkpoint ({error}). Download it again.") from error
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint:
        keys = list(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ConversionError(
            f"{path} is not an original PCME checkpoint: expected a dict with 'model' (and 'criterion', 'config', "
            f"'word2idx'), got {keys}."
        )
    return dict(checkpoint)


def _numpy_scalar_globals() -> list[Any]:
    """The numpy objects a pickled numpy scalar refers to (data, not code), for weights-only loading."""
    try:
        import numpy as np
        from numpy._core.multiarray import scalar
    except ImportError:
        return []
    return [scalar, np.dtype, *{type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")}]


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles only builtin containers and scalars (no class is ever imported)."""

    def find_class(self, module: str, name: str) -> Any:
        raise ConversionError(
            f"The vocabulary pickle refers to {module}.{name}; only a plain dict {{'idx', 'word2idx', 'idx2word'}} "
            "is accepted. Export word2idx to JSON ({word: id}) with the original code and pass that instead."
        )


def load_vocabulary(path: str | os.PathLike) -> dict[str, int]:
    """``word2idx`` from the original ``*_vocab.pkl`` (a pickled dict) or a JSON file ({word: id} or {"word2idx": ...})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Vocabulary not found: {path}.")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
    else:
        logger.warning(VOCAB_PICKLE_WARNING.format(path=path))
        try:
            data = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
        except ConversionError:
            raise
        except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad file
            raise ConversionError(f"{path} is not a readable vocabulary pickle ({error}).") from error
    if isinstance(data, Mapping) and "word2idx" in data:
        data = data["word2idx"]
    if not isinstance(data, Mapping) or not all(isinstance(k, str) and isinstance(v, int) for k, v in data.items()):
        raise ConversionError(f"{path}: expected a mapping word -> integer id (word2idx).")
    return dict(data)


def load_original_config(path: str | os.PathLike | None, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The original YAML config (``--config``), else the checkpoint's ``config``; returns its ``model`` / ``criterion``."""
    if path is not None:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    else:
        config = checkpoint.get("config")
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        raise ConversionError(
            "No original config with a 'model' section: pass the YAML the checkpoint was trained with "
            "(e.g. config/coco/pcme_coco.yaml)."
        )
    return {"model": dict(config["model"]), "criterion": dict(config.get("criterion") or {})}


# ---------------------------------------------------------------------------- architecture
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


# ---------------------------------------------------------------------------- the new model
def build_config(arch: OriginalArchitecture, original: Mapping[str, Any], criterion_state: Mapping[str, Any]):
    from transformers import ResNetConfig

    from hf_pcme.configuration_pcme import PCMEConfig
    from hf_pcme.configuration_pcme_original_text import PCMEOriginalTextConfig

    model_config, criterion = original["model"], original["criterion"]
    vision = ResNetConfig(
        embedding_size=arch.embedding_size, hidden_sizes=arch.hidden_sizes, depths=arch.depths,
        layer_type=arch.block, downsample_in_first_stage=False, downsample_in_bottleneck=False,
    )  # fmt: skip
    text = PCMEOriginalTextConfig(
        vocab_size=arch.vocab_size, word_dim=arch.word_dim, gru_hidden_size=arch.embed_dim,
        pad_token_id=0,
    )  # fmt: skip

    def scalar(name: str, default: float) -> float:
        value = criterion_state.get(name)
        if value is None:
            return float(criterion.get(f"init_{name}", default))
        return float(torch.as_tensor(value).reshape(-1)[0])

    loss_kwargs = {"vib_beta": float(criterion.get("vib_beta", 1e-5))}
    if criterion.get("uniform_lambda"):
        loss_kwargs["uniformity_weight"] = float(criterion["uniform_lambda"])
    return PCMEConfig(
        vision_config=vision, text_config=text, embed_dim=arch.embed_dim, head_type="probabilistic",
        num_samples=int(model_config.get("n_samples_inference") or criterion.get("num_samples") or 7),
        loss_type="pcme", loss_kwargs=loss_kwargs, match_function="sampled",
        init_negative_scale=scalar("negative_scale", 15.0), init_shift=scalar("shift", 15.0),
    )  # fmt: skip


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


def convert_state_dict(
    state: Mapping[str, torch.Tensor], arch: OriginalArchitecture
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Original state dict -> (``PCMEModel`` tensors without ``negative_scale`` / ``shift``, their sources).

    ``sources`` maps each new key to the original key(s) it comes from (for error messages).
    Raises :class:`ConversionError` naming any original key that nothing maps.
    """
    state = _strip_prefix(state)
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ConversionError(f"The checkpoint lacks {key}, which every original PCME model has.")
        used.add(key)
        return state[key].detach().float() if state[key].is_floating_point() else state[key].detach()

    def put(target: str, *keys: str, combine=lambda *tensors: tensors[0]) -> None:
        tensors = [take(key) for key in keys]
        if any(t.shape != tensors[0].shape for t in tensors):
            shapes = ", ".join(f"{key} {tuple(t.shape)}" for key, t in zip(keys, tensors))
            raise ConversionError(f"Shape mismatch: {shapes} are added into {target} and must have one shape.")
        out[target] = combine(*tensors)
        sources[target] = " + ".join(keys)

    def double_sum(*tensors: torch.Tensor) -> torch.Tensor:
        # log_sigma2 = 2 * logsigma: doubling weights and biases is exact in binary floating point
        return 2 * sum(tensors[1:], tensors[0])

    for key in list(state):
        if key.startswith("img_enc.cnn."):
            target = _resnet_key(key[len("img_enc.cnn."):])
            if target is not None:
                put("vision_model." + target, key)
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
        put(f"{branch}.local_proj.weight", f"{unc}.fc.weight", combine=double_sum)
    # image: g = fc(avgpool) for the mean; the uncertainty adds fc2(avgpool)
    put("image_head.mean_branch.global_proj.weight", "img_enc.fc.weight")
    put("image_head.mean_branch.global_proj.bias", "img_enc.fc.bias")
    put("image_head.uncertainty_branch.global_proj.weight", "img_enc.uncertain_net.fc2.weight", combine=double_sum)
    put("image_head.uncertainty_branch.bias", "img_enc.uncertain_net.fc.bias", "img_enc.uncertain_net.fc2.bias",
        combine=double_sum)  # fmt: skip
    # text: the tower's global feature is [sentence GRU, uncertainty GRU] (2D); the mean reads the first
    # half unprojected, log_sigma2 twice the second half (identity blocks: exact)
    d = arch.embed_dim
    eye, zeros = torch.eye(d), torch.zeros(d, d)
    out["text_head.mean_branch.global_proj.weight"] = torch.cat([eye, zeros], dim=1)
    out["text_head.mean_branch.global_proj.bias"] = torch.zeros(d)
    out["text_head.uncertainty_branch.global_proj.weight"] = torch.cat([zeros, 2 * eye], dim=1)
    for key in ("text_head.mean_branch.global_proj.weight", "text_head.mean_branch.global_proj.bias",
                "text_head.uncertainty_branch.global_proj.weight"):  # fmt: skip
        sources[key] = f"identity blocks of size img_enc.fc.weight.shape[0] = {d}"
    put("text_head.uncertainty_branch.bias", "txt_enc.uncertain_net.fc.bias", combine=double_sum)
    put("text_model.word_embeddings.weight", "txt_enc.embed.weight")
    for source, target in (("txt_enc.rnn", "text_model.gru"), ("txt_enc.uncertain_net.rnn", "text_model.uncertainty_gru")):
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            for suffix in ("", "_reverse"):
                put(f"{target}.{name}{suffix}", f"{source}.{name}{suffix}")
    unmapped = sorted(set(state) - used)
    if unmapped:
        raise ConversionError(
            f"{len(unmapped)} tensors of the checkpoint are not mapped to the converted model: {unmapped[:8]}. "
            "It is not an original PCME checkpoint, or a variant this converter does not know."
        )
    return out, sources


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


# ---------------------------------------------------------------------------- tokenizer, processor, card
def build_tokenizer(word2idx: Mapping[str, int], model_max_length: int = 128):
    """A word-level ``PreTrainedTokenizerFast`` with the original vocabulary (no pickle involved).

    Lower-cases, splits like nltk's ``word_tokenize`` for captions (words, hyphenated words and
    punctuation; contractions may split differently), maps unknown words to ``<unk>`` and wraps the
    caption in ``<start>`` ... ``<end>``, as the original data loader does.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel(vocab=dict(word2idx), unk_token=SPECIAL_TOKENS["unk"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"n't|'\w+|\w+(?:[-.']\w+)*|[^\w\s]"), behavior="isolated"),
    ])  # fmt: skip
    start, end = SPECIAL_TOKENS["start"], SPECIAL_TOKENS["end"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{start} $A {end}", special_tokens=[(start, word2idx[start]), (end, word2idx[end])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=SPECIAL_TOKENS["pad"], unk_token=SPECIAL_TOKENS["unk"],
        bos_token=start, eos_token=end, model_max_length=model_max_length, padding_side="right",
    )  # fmt: skip


def build_image_processor(crop_size: int = 224, resize: int = 256):
    """ImageNet normalisation, shorter side resized to 256 (bilinear), centre crop 224: the original test transform."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": resize}, crop_size={"height": crop_size, "width": crop_size}, do_center_crop=True,
        resample=Image.Resampling.BILINEAR, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True,
    )  # fmt: skip


MODEL_CARD = """---
library_name: transformers
tags:
- hf_pcme
- pcme
- cross-modal-retrieval
- probabilistic-embeddings
pipeline_tag: cross-modal-retrieval
---

# PCME ({cnn_type}, D = {embed_dim}), converted from the original release

Probabilistic Cross-Modal Embeddings (Chun et al., "Probabilistic Embeddings for Cross-Modal
Retrieval", CVPR 2021), converted from a checkpoint of the original code
([naver-ai/pcme](https://github.com/naver-ai/pcme)) with `scripts/convert_pcme_original_checkpoint.py`
of `hf_pcme`. See the original repository for the training data, results and licence of the weights.

- Source checkpoint: `{checkpoint}` ({num_tensors} tensors, all mapped); vocabulary: {vocab_size} words.
- Image tower: {cnn_type} (transformers `ResNetModel`, same weights); caption tower: the original
  word embeddings + bi-GRU (`pcme_original_text`); PIE mean heads and uncertainty heads as trained.
- `log_sigma2` is the log **variance**: the original's `logsigma` is a log standard deviation
  (it samples `mean + exp(logsigma) * eps`), so `log_sigma2 = 2 * logsigma` exactly.
- Match probability: a = {negative_scale:.6g}, b = {shift:.6g}, J = {num_samples} samples,
  `p = mean sigmoid(2 (-a d + b))`, as in the original.
- Pre-processing: images resized to 256 (shorter side), centre-cropped to 224, ImageNet
  normalisation; captions lower-cased, split into words (close to nltk `word_tokenize`), wrapped
  in `<start>` ... `<end>`.

```python
import hf_pcme
from transformers import AutoModel, AutoProcessor, pipeline

model = AutoModel.from_pretrained("{name}")
processor = AutoProcessor.from_pretrained("{name}")
retriever = pipeline("cross-modal-retrieval", model="{name}")
```
"""


@dataclass
class ConversionResult:
    model: Any
    processor: Any
    word2idx: dict[str, int]
    architecture: OriginalArchitecture
    num_tensors: int


def convert_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    vocab: str | os.PathLike | Mapping[str, int] | None = None,
    config: str | os.PathLike | None = None,
    allow_pickle: bool = False,
) -> ConversionResult:
    """Build a :class:`PCMEModel` and its processor from an original PCME checkpoint.

    Args:
        checkpoint: path of ``model_best.pth`` (or the loaded dict).
        vocab: ``coco_vocab.pkl`` / ``cub_vocab.pkl`` / a JSON ``{word: id}``, or a mapping; default:
            the checkpoint's ``word2idx``. When both exist they must agree.
        config: the original YAML (``pcme_coco.yaml``); default: the checkpoint's ``config``.
        allow_pickle: load the checkpoint with full unpickling (only for files you trust).
    """
    from hf_pcme.modeling_pcme import PCMEModel
    from hf_pcme.processing_pcme import PCMEProcessor

    data = dict(checkpoint) if isinstance(checkpoint, Mapping) else load_original_checkpoint(checkpoint, allow_pickle)
    state = _strip_prefix(data["model"])
    original = load_original_config(config, data)
    arch = infer_architecture(state, original["model"])
    stored = data.get("word2idx")
    if vocab is None:
        if not isinstance(stored, Mapping):
            raise ConversionError("The checkpoint has no word2idx: pass the vocabulary (--vocab coco_vocab.pkl).")
        word2idx = dict(stored)
    else:
        word2idx = dict(vocab) if isinstance(vocab, Mapping) else load_vocabulary(vocab)
        if isinstance(stored, Mapping) and dict(stored) != word2idx:
            raise ConversionError(
                f"The vocabulary given ({len(word2idx)} words) differs from the checkpoint's word2idx ({len(stored)} "
                "words): pass the vocabulary the checkpoint was trained with."
            )
    check_vocabulary(word2idx, arch)
    criterion_state = data.get("criterion") or {}
    pcme_config = build_config(arch, original, criterion_state)
    model = PCMEModel(pcme_config).eval()
    converted, sources = convert_state_dict(state, arch)
    load_into_model(model, converted, sources)
    processor = PCMEProcessor(image_processor=build_image_processor(), tokenizer=build_tokenizer(word2idx))
    return ConversionResult(model=model, processor=processor, word2idx=word2idx, architecture=arch,
                            num_tensors=len(state))  # fmt: skip


def save_converted(
    result: ConversionResult, output_dir: str | os.PathLike, checkpoint_name: str = "model_best.pth",
    cnn_type: str | None = None, push_to_hub: str | None = None,
) -> Path:
    """Write model (safetensors), processor (tokenizer.json: no pickle) and model card to ``output_dir``."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(output)
    result.processor.save_pretrained(output)
    arch = result.architecture
    name = push_to_hub or str(output)
    cnn = cnn_type or f"ResNet (stages {arch.depths}, {arch.block})"
    config = result.model.config
    card = MODEL_CARD.format(
        cnn_type=cnn, embed_dim=arch.embed_dim, checkpoint=checkpoint_name, num_tensors=result.num_tensors,
        vocab_size=len(result.word2idx), negative_scale=config.init_negative_scale, shift=config.init_shift,
        num_samples=config.num_samples, name=name,
    )  # fmt: skip
    (output / "README.md").write_text(card, encoding="utf-8")
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, exist_ok=True)
        api.upload_folder(folder_path=str(output), repo_id=push_to_hub, commit_message="Convert original PCME checkpoint")
    return output


__all__ = [
    "ConversionError",
    "ConversionResult",
    "OriginalArchitecture",
    "build_tokenizer",
    "convert_checkpoint",
    "convert_state_dict",
    "infer_architecture",
    "load_original_checkpoint",
    "load_vocabulary",
    "save_converted",
]
