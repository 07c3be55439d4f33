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

Reading the inputs is in :mod:`~hf_pcme.conversion.pcme_original_inputs`, the architecture and the
weight mapping in :mod:`~hf_pcme.conversion.pcme_original_weights`; this module builds the config,
tokenizer, processor and model card, and re-exports the public names of both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .pcme_original_inputs import (
    SPECIAL_TOKENS,
    VOCAB_PICKLE_WARNING,
    ConversionError,
    load_original_checkpoint,
    load_original_config,
    load_vocabulary,
)
from .pcme_original_weights import (
    BN_SUFFIXES,
    TORCHVISION_RESNETS,
    OriginalArchitecture,
    _strip_prefix,
    check_vocabulary,
    convert_state_dict,
    infer_architecture,
    load_into_model,
)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


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
    "BN_SUFFIXES",
    "SPECIAL_TOKENS",
    "TORCHVISION_RESNETS",
    "VOCAB_PICKLE_WARNING",
    "ConversionError",
    "ConversionResult",
    "OriginalArchitecture",
    "build_config",
    "build_image_processor",
    "build_tokenizer",
    "check_vocabulary",
    "convert_checkpoint",
    "convert_state_dict",
    "infer_architecture",
    "load_into_model",
    "load_original_checkpoint",
    "load_original_config",
    "load_vocabulary",
    "save_converted",
]
