"""Configuration of :class:`PCMEModel`: two towers, a projection head per tower, a loss."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .configuration_pcme_original_text import PCMEOriginalTextConfig
from .configuration_text_encoders import PCMEBiGRUConfig
from .configuration_textgcn import PCMETextGCNConfig
from .registry import lookup

#: Tower configs shipped with this package. They are resolved here rather than through
#: ``AutoConfig`` so that a saved model also loads with ``trust_remote_code=True`` in a process
#: where ``hf_pcme`` is not installed (and so "pcme_bigru" is unknown to ``AutoConfig``).
BUILTIN_TOWER_CONFIGS: dict[str, type[PreTrainedConfig]] = {
    "pcme_bigru": PCMEBiGRUConfig,
    "pcme_textgcn": PCMETextGCNConfig,
    "pcme_original_text": PCMEOriginalTextConfig,  # converted original PCME checkpoints
}

#: How :meth:`PCMEModel.match_probability` turns two Gaussians into a probability.
MATCH_FUNCTIONS = {"sampled": "PCME Monte-Carlo over J x J samples", "csd": "PCME++ closed-form sampled distance"}
#: Scores a config may name as ``ranking_score`` instead of the one its head and match function imply.
RANKING_SCORES = {"cosine": "cosine of the means (a probabilistic head whose means were trained with InfoNCE)"}


def resolve_tower_config(name: str, value: PreTrainedConfig | dict | None, default_model_type: str) -> PreTrainedConfig:
    """Turn a sub-config given as a config, a dict (with ``model_type``) or ``None`` into a config object."""
    if isinstance(value, PreTrainedConfig):
        return value
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a PreTrainedConfig, a dict with a 'model_type' key, or None; got {type(value)}.")
    value = dict(value)
    model_type = value.pop("model_type", default_model_type)
    if model_type in BUILTIN_TOWER_CONFIGS:
        return BUILTIN_TOWER_CONFIGS[model_type](**value)
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"{name} has unknown model_type {model_type!r}: use a transformers model type (e.g. 'resnet', 'vit', "
            f"'clip_vision_model', 'bert', 'clip_text_model') or one of {sorted(BUILTIN_TOWER_CONFIGS)}."
        )
    return CONFIG_MAPPING[model_type](**value)


class PCMEConfig(PreTrainedConfig):
    r"""Configuration of a probabilistic (or deterministic / polysemous) dual encoder.

    Args:
        vision_config: config of the image tower: any transformers vision backbone (ResNet, ViT,
            CLIP vision, ...) as a config object or a dict with ``model_type``.
        text_config: config of the text tower: any transformers text backbone (BERT, CLIP text,
            ...) or the built-in ``"pcme_bigru"`` / ``"pcme_textgcn"`` (dual-path GCN text path).
        embed_dim: size D of the joint embedding space (1024 for COCO, 512 for CUB in PCME).
        head_type: ``"probabilistic"`` (PCME: mean + ``log_sigma2``), ``"deterministic"``
            (VSE++ / InfoNCE: a point), ``"polysemous"`` (PVSE: K points) or ``"diversified_attention"``
            (GPLDAN: K points from interacting attention maps).
        num_embeds: K, embeddings per item for the polysemous head.
        num_samples: J, Monte-Carlo samples per item for the sampled match probability (7 in PCME).
        attention_hidden_dim: hidden size of the additive attention pooling (``None``: half the
            local-feature size).
        head_dropout: dropout on the local residual branch of the heads.
        loss_type: training objective, one of ``pcme`` (sampled contrastive + VIB), ``pcme++``
            (closed-form sampled distance), ``infonce``, ``vsepp``, ``pvse``, ``center``,
            ``pairwise_similarity`` (dual-path GCN), ``graph_pattern`` (GPLDAN).
        loss_kwargs: keyword arguments of the loss (e.g. ``{"vib_beta": 1e-5}``).
        init_negative_scale: initial ``a`` of the match probability ``sigmoid(2(-a d + b))``
            (15 on COCO, 5 on CUB in PCME).
        init_shift: initial ``b`` (15 on COCO, 5 on CUB in PCME).
        init_log_sigma2: initial log variance of the probabilistic heads (the bias of their
            ``log_sigma2`` branch); ``None`` keeps PCME's zero bias (sigma^2 near 1). Towers
            trained from scratch need small initial variances (e.g. -5): with sigma^2 near 1 the
            sampling noise swamps the still-similar means and all embeddings collapse.
        match_function: how ``match_probability`` is computed: ``"sampled"`` (PCME, J x J
            sample pairs) or ``"csd"`` (PCME++, ``sigmoid(-a * CSD + b)``).
        ranking_score: the score the model ranks by (:func:`hf_pcme.scoring.default_score`):
            ``None`` derives it from ``head_type`` / ``match_function``; ``"cosine"`` (the only
            other choice) ranks a probabilistic model by the cosine of its means while
            ``match_probability`` and the variances stay as they are (for means trained with
            InfoNCE, e.g. loss ``infonce_inclusion``).
        initializer_range: std of the normal initialisation of the heads' linear layers.
        inference_seed: seed of the Monte-Carlo samples drawn in eval mode (``model.eval()``), so
            eval-mode outputs are a function of the inputs and this seed: images draw from a
            generator seeded ``2 * inference_seed``, captions from ``2 * inference_seed + 1``, created per
            call on the input's device. ``None`` = fresh noise from torch's global generator. A
            ``generator=`` argument overrides it per call; training mode always uses fresh noise.
    """

    model_type = "pcme"

    vision_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    embed_dim: int = 1024
    head_type: str = "probabilistic"
    num_embeds: int = 2
    num_samples: int = 7
    attention_hidden_dim: int | None = None
    head_dropout: float = 0.0
    loss_type: str = "pcme"
    loss_kwargs: dict | None = None
    init_negative_scale: float = 15.0
    init_shift: float = 15.0
    init_log_sigma2: float | None = None
    match_function: str = "sampled"
    ranking_score: str | None = None
    initializer_range: float = 0.02
    inference_seed: int | None = 0

    def __post_init__(self, **kwargs: Any):
        self.vision_config = resolve_tower_config("vision_config", self.vision_config, "resnet")
        self.text_config = resolve_tower_config("text_config", self.text_config, "pcme_bigru")
        self.loss_kwargs = dict(self.loss_kwargs or {})
        # head_type and loss_type are checked against their registries when the model is built: the
        # configuration imports no nn code.
        lookup(MATCH_FUNCTIONS, self.match_function, "match_function")
        if self.ranking_score is not None:
            lookup(RANKING_SCORES, self.ranking_score, "ranking_score")
            if self.head_type not in ("probabilistic", "deterministic"):
                raise ValueError(f"ranking_score {self.ranking_score!r} needs one embedding per item (head_type "
                                 f"'probabilistic' or 'deterministic'), got head_type {self.head_type!r}; remove it.")
        if not type(self).__module__.startswith("transformers_modules"):
            # A saved folder declares the retrieval pipeline as remote code (for environments without
            # hf_pcme). Where the package is installed its registered pipeline serves the task, and
            # keeping the declaration would make transformers demand trust_remote_code=True.
            kwargs.pop("custom_pipelines", None)
        if self.init_log_sigma2 is not None and self.head_type != "probabilistic":
            raise ValueError(
                f"init_log_sigma2 only applies to head_type 'probabilistic' (a {self.head_type!r} head has no "
                "variance); remove it or change head_type."
            )
        for name in ("embed_dim", "num_embeds", "num_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        super().__post_init__(**kwargs)

    @classmethod
    def from_vision_text_configs(
        cls, vision_config: PreTrainedConfig, text_config: PreTrainedConfig, **kwargs: Any
    ) -> "PCMEConfig":
        """Build a config from the configs of the two towers."""
        return cls(vision_config=vision_config, text_config=text_config, **kwargs)


__all__ = ["PCMEConfig", "resolve_tower_config", "BUILTIN_TOWER_CONFIGS"]
