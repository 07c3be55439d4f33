"""Build the model and the processor a recipe describes (towers from hub ids, local folders or configs)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedModel

from ..configuration_pcme import PCMEConfig
from ..modeling_pcme import BUILTIN_TOWERS, PCMEModel, load_pretrained_tower
from ..processing_pcme import PCMEProcessor
from ..tokenization import build_word_level_tokenizer
from .config import ModelRecipe, Recipe

logger = logging.getLogger(__name__)

#: ImageNet statistics: what the pretrained CNN towers expect, and the default otherwise.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: ModelRecipe fields that are PCMEConfig fields of the same name.
_CONFIG_FIELDS = (
    "embed_dim",
    "head_type",
    "num_embeds",
    "num_samples",
    "attention_hidden_dim",
    "head_dropout",
    "loss_type",
    "loss_kwargs",
    "init_negative_scale",
    "init_shift",
    "match_function",
    "init_log_sigma2",
    "ranking_score",
)


def pcme_config_kwargs(model: ModelRecipe) -> dict[str, Any]:
    """The :class:`~hf_pcme.PCMEConfig` keyword arguments of a model recipe (all but the towers)."""
    return {name: getattr(model, name) for name in _CONFIG_FIELDS}


def _uses_builtin_text_tower(model: ModelRecipe) -> bool:
    if model.text_tower is not None:
        return False
    return (model.text_config or {}).get("model_type", "pcme_bigru") in BUILTIN_TOWERS


def build_tokenizer(recipe: Recipe, captions: Iterable[str] | None = None):
    """The tokenizer named by ``model.tokenizer`` / ``model.text_tower``, or a word-level one built from ``captions``."""
    model = recipe.model
    name = model.tokenizer or model.text_tower
    if name is not None:
        return AutoTokenizer.from_pretrained(name, model_max_length=model.max_caption_length)
    if captions is None:
        raise ValueError(
            "The recipe has no model.tokenizer or model.text_tower, so the word-level tokenizer of the bi-GRU "
            "must be built from the training captions, but none were given."
        )
    return build_word_level_tokenizer(
        captions, min_frequency=model.vocab_min_frequency, model_max_length=model.max_caption_length
    )


def build_image_processor(recipe: Recipe):
    """The image processor of ``model.vision_tower`` (resized to ``data.image_size``), or an ImageNet-normalising one."""
    size = recipe.data.image_size
    if recipe.model.vision_tower is not None:
        try:
            return AutoImageProcessor.from_pretrained(recipe.model.vision_tower)
        except (OSError, ValueError) as error:  # a tower folder saved without its processor
            logger.warning("No image processor found for %s (%s); using a plain resize + ImageNet normalisation.",
                           recipe.model.vision_tower, error)
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(
        size={"height": size, "width": size}, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)
    )


def build_processor(recipe: Recipe, captions: Iterable[str] | None = None) -> PCMEProcessor:
    """Image processor + tokenizer for a recipe; ``model.pretrained`` loads the saved processor instead."""
    if recipe.model.pretrained is not None:
        return PCMEProcessor.from_pretrained(recipe.model.pretrained)
    return PCMEProcessor(image_processor=build_image_processor(recipe), tokenizer=build_tokenizer(recipe, captions))


def needs_training_captions(recipe: Recipe) -> bool:
    """Whether building the recipe's model needs the training captions (a word-level tokenizer, or Word2Vec for the text GCN)."""
    model = recipe.model
    if model.pretrained is not None or model.text_tower is not None:
        return False
    gcn_needs_vectors = _uses_text_gcn(model) and model.word_embeddings is None
    return model.tokenizer is None or gcn_needs_vectors


def _uses_text_gcn(model: ModelRecipe) -> bool:
    return model.text_tower is None and (model.text_config or {}).get("model_type") == "pcme_textgcn"


def build_model(recipe: Recipe, tokenizer: Any = None, captions: Iterable[str] | None = None) -> PCMEModel:
    """The :class:`~hf_pcme.PCMEModel` of a recipe.

    ``model.pretrained`` loads a whole saved model. Otherwise each tower is loaded pretrained from
    ``vision_tower`` / ``text_tower`` (hub id or local folder) or built from ``vision_config`` /
    ``text_config``; the built-in bi-GRU gets ``vocab_size`` / ``pad_token_id`` from ``tokenizer``
    and, with ``model.word_embeddings``, GloVe word vectors. The text GCN gets its word vectors and
    word graph from ``model.word_embeddings`` (word2vec text format) or from Word2Vec trained on
    ``captions`` (see :mod:`hf_pcme.training.word_vectors`).
    """
    model_recipe = recipe.model
    if model_recipe.architecture == "imram":
        from .builders_imram import build_imram_model

        return build_imram_model(recipe, tokenizer)
    if model_recipe.pretrained is not None:
        return PCMEModel.from_pretrained(model_recipe.pretrained)
    vision_model = load_pretrained_tower(model_recipe.vision_tower) if model_recipe.vision_tower else None
    text_model = load_pretrained_tower(model_recipe.text_tower) if model_recipe.text_tower else None
    text_config: Any = dict(model_recipe.text_config or {"model_type": "pcme_bigru"})
    if _uses_builtin_text_tower(model_recipe) and tokenizer is not None:
        text_config["vocab_size"] = len(tokenizer)
        text_config["pad_token_id"] = tokenizer.pad_token_id
    config = PCMEConfig(
        vision_config=vision_model.config if vision_model is not None else dict(model_recipe.vision_config or {}),
        text_config=text_model.config if text_model is not None else text_config,
        **pcme_config_kwargs(model_recipe),
    )
    model = PCMEModel(config, vision_model=vision_model, text_model=text_model)
    if _uses_text_gcn(model_recipe):
        from .word_vectors import initialise_text_gcn

        if tokenizer is None:
            raise ValueError("The text GCN (text_config.model_type 'pcme_textgcn') needs the tokenizer to build its word graph.")
        covered = initialise_text_gcn(model.text_model, tokenizer, captions, model_recipe.word_embeddings, seed=recipe.seed)
        logger.info("Text GCN: word vectors for %d of %d vocabulary words.", covered, len(tokenizer))
    elif model_recipe.word_embeddings is not None:
        if not _uses_builtin_text_tower(model_recipe) or tokenizer is None:
            raise ValueError("model.word_embeddings (GloVe vectors) only applies to the built-in bi-GRU text tower.")
        found = model.text_model.load_word_vectors(model_recipe.word_embeddings, tokenizer.get_vocab())
        logger.info("Initialised %d of %d word vectors from %s.", found, len(tokenizer), model_recipe.word_embeddings)
    return model


def build_training_module(model: Any, train_recipe: Any, processor: Any = None, modality_classifier: Any = None) -> Any:
    """The ``nn.Module`` whose forward is one training step's loss on the global batch (PCME or IMRAM)."""
    from ..modeling_imram import IMRAMModel
    from .module import ContrastiveTrainingModule

    if isinstance(model, IMRAMModel):
        from .module_imram import IMRAMTrainingModule

        return IMRAMTrainingModule(model, diagonal_positives_only=train_recipe.diagonal_positives_only)
    tokenizer = getattr(processor, "tokenizer", None)
    return ContrastiveTrainingModule(
        model, diagonal_positives_only=train_recipe.diagonal_positives_only,
        duplicate_caption_positives=train_recipe.duplicate_caption_positives,
        duplicate_caption_inclusion=train_recipe.duplicate_caption_inclusion,
        mix_batch_ratio=train_recipe.mix_batch_ratio, partial_caption_ratio=train_recipe.partial_caption_ratio,
        word_drop_prob=train_recipe.word_drop_prob,
        protected_token_ids=tuple(getattr(tokenizer, "all_special_ids", ())),
        modality_classifier=modality_classifier,
    )


__all__ = [
    "build_image_processor",
    "build_model",
    "build_processor",
    "build_training_module",
    "build_tokenizer",
    "needs_training_captions",
    "pcme_config_kwargs",
]
