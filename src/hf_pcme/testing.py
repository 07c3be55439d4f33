"""Tiny configurations and fixtures for tests, examples and smoke runs (CPU, seconds)."""

from __future__ import annotations

from typing import Any

from PIL import Image

from .configuration_pcme import PCMEConfig
from .processing_pcme import PCMEProcessor
from .tokenization import build_word_level_tokenizer

TINY_CAPTIONS = (
    "a small red circle at the top left",
    "a large blue square",
    "a green triangle and a red circle",
    "some shapes",
)


def tiny_vision_config(**overrides: Any) -> dict[str, Any]:
    """A ResNet with two narrow stages: 32 x 32 images -> a 4 x 4 grid of 16-d local features."""
    config = {
        "model_type": "resnet",
        "num_channels": 3,
        "embedding_size": 8,
        "hidden_sizes": [8, 16],
        "depths": [1, 1],
        "layer_type": "basic",
        "downsample_in_first_stage": False,
    }
    config.update(overrides)
    return config


def tiny_text_config(vocab_size: int = 64, **overrides: Any) -> dict[str, Any]:
    """A bi-GRU with 8-d word embeddings and 16-d outputs."""
    config = {"model_type": "pcme_bigru", "vocab_size": vocab_size, "word_dim": 8, "hidden_size": 16}
    config.update(overrides)
    return config


def tiny_pcme_config(**overrides: Any) -> PCMEConfig:
    """A complete PCMEConfig small enough for unit tests (embed_dim 8, J = 3)."""
    fields: dict[str, Any] = {
        "vision_config": tiny_vision_config(),
        "text_config": tiny_text_config(),
        "embed_dim": 8,
        "num_samples": 3,
        "init_negative_scale": 5.0,
        "init_shift": 5.0,
    }
    fields.update(overrides)
    return PCMEConfig(**fields)


def tiny_processor(texts: tuple[str, ...] | list[str] = TINY_CAPTIONS, image_size: int = 32) -> PCMEProcessor:
    """A processor with a PIL-based image processor at ``image_size`` and a word-level tokenizer on ``texts``."""
    from transformers import ViTImageProcessorPil

    image_processor = ViTImageProcessorPil(size={"height": image_size, "width": image_size})
    return PCMEProcessor(image_processor=image_processor, tokenizer=build_word_level_tokenizer(texts))


def tiny_images(count: int, size: int = 32) -> list[Image.Image]:
    """Deterministic solid-colour RGB images."""
    return [Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)) for i in range(count)]
