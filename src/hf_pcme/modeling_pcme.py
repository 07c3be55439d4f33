"""PCMEModel: a dual encoder whose heads map images and captions to Gaussians (or points).

References:
    PCME: Chun et al., "Probabilistic Embeddings for Cross-Modal Retrieval", CVPR 2021.
    PCME++: Chun, "Improved Probabilistic Image-Text Representations", ICLR 2024.
    PVSE: Song & Soleymani, "Polysemous Visual-Semantic Embedding for Cross-Modal Retrieval", CVPR 2019.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from .configuration_pcme import PCMEConfig
from .distances import iter_row_chunks, sample_gaussian
from .heads import HEADS, UncertaintyBranch
from .losses import build_loss
from .modeling_towers import (
    BUILTIN_TOWERS,
    build_tower,
    load_pretrained_tower,
    tower_feature_dim,
    tower_local_and_global,
)
from .outputs import PCMEOutput, ProbabilisticEmbedding
from .registry import lookup
from .scoring import BestPairScore, CosineScore, CSDScore, SampledMatchScore

#: Offsets of the images' and the captions' generator seeds (``2 * inference_seed + stream``), so the two
#: modalities draw independent noise (the metrics' sampled scorer uses the same convention).
_IMAGE_STREAM, _TEXT_STREAM = 0, 1

#: Rows of the query side processed at once by the pairwise scores, bounding the
#: (rows x J) x (M x J) intermediate of the sampled match probability.
PAIRWISE_CHUNK_SIZE = 256


def missing_config_error(name_or_path: str | os.PathLike, subfolder: str | None = None) -> FileNotFoundError | None:
    """The error for a local model folder that has no ``config.json`` (``None`` if it has one or is no folder).

    transformers would instead build a default config (``PCMEModel``) or ask for a ``model_type`` key
    (``AutoModel``, ``pipeline``), neither of which says what is wrong.
    """
    folder = os.path.join(str(name_or_path), subfolder) if subfolder else str(name_or_path)
    if not os.path.isdir(folder) or os.path.isfile(os.path.join(folder, "config.json")):
        return None
    present = sorted(os.listdir(folder))
    listing = ", ".join(present[:8]) + (" ..." if len(present) > 8 else "") if present else "nothing"
    return FileNotFoundError(
        f"config.json not found in {folder} (it holds {listing}). A saved model folder has config.json next to "
        "its weights (model.safetensors): pass the folder that model.save_pretrained(...) wrote, or the "
        "checkpoint's parent if this is one of its sub-folders."
    )


class StrictLoadingMixin:
    """``from_pretrained`` for this package's models: a clear error instead of a half-loaded model.

    Put before ``PreTrainedModel`` in the bases; ``missing_weights_hint`` ends the missing-weights error.
    """

    missing_weights_hint: str = ""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """``PreTrainedModel.from_pretrained`` that refuses to return a half-loaded model (PCME and IMRAM).

        Corrupt or truncated weight files and checkpoints that lack some of the model's weights raise
        an ``OSError`` naming the folder, instead of silently leaving weights randomly initialised; a
        local folder without ``config.json`` raises ``FileNotFoundError`` (instead of building a default
        model whose weights then do not fit).
        """
        if kwargs.get("config") is None:
            missing_config = missing_config_error(pretrained_model_name_or_path, kwargs.get("subfolder"))
            if missing_config is not None:
                raise missing_config
        output_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except SafetensorError as error:
            raise OSError(
                f"The weights under {pretrained_model_name_or_path} are corrupt or truncated ({error}). "
                "Download them again, or re-create them with model.save_pretrained(...)."
            ) from error
        missing = sorted(loading_info.get("missing_keys") or [])
        if missing:
            shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise OSError(
                f"The checkpoint under {pretrained_model_name_or_path} lacks {len(missing)} weights of "
                f"{cls.__name__} ({shown}). It was saved by a different model or configuration; "
                f"check its config.json{cls.missing_weights_hint}."
            )
        return (model, loading_info) if output_loading_info else model


class PCMEPreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    config_class = PCMEConfig
    config: PCMEConfig
    base_model_prefix = "pcme"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    missing_weights_hint = ", or build the model from its towers with from_vision_text_pretrained"

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """``PreTrainedModel.save_pretrained`` that also ships the retrieval pipeline as remote code.

        The folder's config declares ``custom_pipelines`` and holds the pipeline's code, so
        ``pipeline("cross-modal-retrieval", model=folder, trust_remote_code=True)`` works where
        hf_pcme is not installed.
        """
        from .pipeline_cross_modal_retrieval import declare_pipeline

        declare_pipeline(self.config, save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, PCMEModel):
            init.constant_(module.negative_scale, self.config.init_negative_scale)
            init.constant_(module.shift, self.config.init_shift)
        elif isinstance(module, UncertaintyBranch):
            init.constant_(module.bias, self.config.init_log_sigma2 or 0.0)
        elif module is getattr(self, "criterion", None) and hasattr(module, "reset_parameters"):
            module.reset_parameters()


class PCMEModel(PCMEPreTrainedModel):
    """Image tower + text tower + one projection head each + the training loss.

    Each input becomes a :class:`ProbabilisticEmbedding`: a Gaussian ``N(mean, diag(exp(log_sigma2)))``
    for ``head_type="probabilistic"``, a point for ``"deterministic"``, K points for ``"polysemous"``.
    The learnable scalars ``negative_scale`` (a) and ``shift`` (b) of the match probability live
    on the model, so every loss and :meth:`match_probability` use the same ones.
    """

    def __init__(
        self,
        config: PCMEConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else build_tower(config.vision_config)
        self.text_model = text_model if text_model is not None else build_tower(config.text_config)
        # Keep a single source of truth for the tower configs (as VisionTextDualEncoderModel does).
        self.vision_model.config = self.config.vision_config
        self.text_model.config = self.config.text_config

        head_class = lookup(HEADS, config.head_type, "head_type")
        self.image_head = self._build_head(head_class, tower_feature_dim(config.vision_config))
        self.text_head = self._build_head(
            head_class, tower_feature_dim(config.text_config), getattr(config.text_config, "global_feature_size", None)
        )

        self.negative_scale = nn.Parameter(torch.tensor(float(config.init_negative_scale)))
        self.shift = nn.Parameter(torch.tensor(float(config.init_shift)))
        self.criterion = build_loss(config.loss_type, embed_dim=config.embed_dim, **config.loss_kwargs)
        if not getattr(self.criterion, "uses_match_parameters", False):
            # a, b still define match_probability, but nothing trains them: keep them out of
            # the optimiser (and out of DDP's unused-parameter check).
            self.negative_scale.requires_grad_(False)
            self.shift.requires_grad_(False)
        self.post_init()

    def _build_head(self, head_class: type[nn.Module], feature_dim: int, global_dim: int | None = None) -> nn.Module:
        config = self.config
        return head_class(
            local_dim=feature_dim,
            global_dim=global_dim or feature_dim,
            embed_dim=config.embed_dim,
            hidden_dim=config.attention_hidden_dim or max(feature_dim // 2, 1),
            dropout=config.head_dropout,
            num_embeds=config.num_embeds,
        )

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str | os.PathLike,
        text_model_name_or_path: str | os.PathLike,
        vision_kwargs: dict[str, Any] | None = None,
        text_kwargs: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> "PCMEModel":
        """Build a model from two pretrained towers (hub ids or local folders) and fresh heads.

        ``config_kwargs`` are :class:`PCMEConfig` fields (``embed_dim``, ``head_type``, ...).
        """
        towers = []
        for name, kwargs in ((vision_model_name_or_path, vision_kwargs), (text_model_name_or_path, text_kwargs)):
            tower = load_pretrained_tower(name, **(kwargs or {}))
            towers.append(tower)
        vision_model, text_model = towers
        config = PCMEConfig(vision_config=vision_model.config, text_config=text_model.config, **config_kwargs)
        return cls(config, vision_model=vision_model, text_model=text_model)

    # ------------------------------------------------------------------ encoding
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> ProbabilisticEmbedding:
        """Embed images: ``pixel_values (B, 3, H, W)`` -> :class:`ProbabilisticEmbedding`.

        ``num_samples`` (default ``config.num_samples``; 0 = none) samples are drawn for
        probabilistic heads: in eval mode from a generator seeded by ``config.inference_seed``
        (the same inputs give the same samples), in training mode fresh; a ``generator`` (on the
        inputs' device) overrides both.
        """
        if pixel_values is None or pixel_values.dim() != 4:
            shape = None if pixel_values is None else tuple(pixel_values.shape)
            raise ValueError(f"pixel_values must be a (batch, channels, height, width) tensor, got {shape}.")
        outputs = self.vision_model(pixel_values=pixel_values)
        local, pooled, mask = tower_local_and_global(outputs)
        return self._with_samples(self.image_head(local, pooled, mask), num_samples, generator, _IMAGE_STREAM)

    def get_text_features(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
        **text_kwargs: Any,
    ) -> ProbabilisticEmbedding:
        """Embed captions: ``input_ids (B, L)`` (+ ``attention_mask``) -> :class:`ProbabilisticEmbedding`.

        Samples as in :meth:`get_image_features` (captions use their own seeded stream in eval mode).
        """
        if input_ids is None or input_ids.dim() != 2:
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"input_ids must be a (batch, length) tensor, got {shape}.")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}."
            )
        outputs = self.text_model(input_ids=input_ids, attention_mask=attention_mask, **text_kwargs)
        local, pooled, mask = tower_local_and_global(outputs, attention_mask)
        return self._with_samples(self.text_head(local, pooled, mask), num_samples, generator, _TEXT_STREAM)

    def _with_samples(
        self,
        embedding: ProbabilisticEmbedding,
        num_samples: int | None,
        generator: torch.Generator | None,
        stream: int = _IMAGE_STREAM,
    ) -> ProbabilisticEmbedding:
        if embedding.log_sigma2 is None:
            return embedding
        num_samples = self.config.num_samples if num_samples is None else num_samples
        if num_samples > 0:
            generator = self._sampling_generator(embedding.mean.device, generator, stream)
            embedding.samples = sample_gaussian(embedding.mean, embedding.log_sigma2, num_samples, generator)
        return embedding

    def _sampling_generator(
        self, device: torch.device, generator: torch.Generator | None, stream: int
    ) -> torch.Generator | None:
        """The generator of one modality's samples: the caller's, else (eval mode) one seeded by
        ``2 * config.inference_seed + stream`` on ``device``, else ``None`` (torch's global generator)."""
        if generator is not None:
            if generator.device.type != device.type:
                raise ValueError(
                    f"generator is on {generator.device} but the embeddings are on {device}; create it there: "
                    f"torch.Generator(device={str(device)!r}).manual_seed(seed)."
                )
            return generator
        seed = getattr(self.config, "inference_seed", None)
        if self.training or seed is None:
            return None
        return torch.Generator(device=device).manual_seed(2 * int(seed) + stream)

    # ------------------------------------------------------------------ scoring
    def match_probability(self, image_embeds: ProbabilisticEmbedding, text_embeds: ProbabilisticEmbedding) -> torch.Tensor:
        """Match probabilities ``(N_img, N_txt)`` in [0, 1].

        ``match_function="sampled"`` (PCME): ``p = 1/J^2 sum_jj' sigmoid(2(-a ||z_v^j - z_t^j'|| + b))``
        over the samples (a deterministic embedding is a Gaussian with zero variance, i.e. one
        sample: its mean; a polysemous item's K embeddings act as its samples).
        ``match_function="csd"`` (PCME++): ``p = sigmoid(-a CSD(v, t) + b)``.
        """
        return self._pairwise(image_embeds, text_embeds)[1]

    def pairwise_logits(self, image_embeds: ProbabilisticEmbedding, text_embeds: ProbabilisticEmbedding) -> torch.Tensor:
        """Ranking scores ``(N_img, N_txt)``, higher = better: the log match probability for probabilistic
        heads (sampled or CSD, by ``config.match_function``), the cosine of the means for deterministic heads,
        and the best cosine over the K x K embedding pairs for polysemous heads (PVSE)."""
        return self._pairwise(image_embeds, text_embeds)[0]

    def _pairwise(self, image: ProbabilisticEmbedding, text: ProbabilisticEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, match probabilities)``, both ``(N_img, N_txt)``, from one pass over row chunks."""
        logits, probabilities = [], []
        for rows in iter_row_chunks(image.mean.shape[0], PAIRWISE_CHUNK_SIZE):
            block_logits, block_probabilities = self._pairwise_block(image.select(rows), text)
            logits.append(block_logits)
            probabilities.append(block_probabilities)
        return torch.cat(logits, dim=0), torch.cat(probabilities, dim=0)

    def _pairwise_block(self, image: ProbabilisticEmbedding, text: ProbabilisticEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ranking scores, p)`` of one block, by the scores of :mod:`hf_pcme.scoring`
        (``scoring.default_score(config)`` names the ranking this gives)."""
        a, b = self.negative_scale.float(), self.shift.float()
        if self.config.match_function == "csd" and image.log_sigma2 is not None and text.log_sigma2 is not None:
            logits = a * CSDScore().pairwise(image, text) + b  # -a CSD + b
            ranking, match_prob = torch.nn.functional.logsigmoid(logits), torch.sigmoid(logits)
        else:
            log_p = SampledMatchScore(a, b).pairwise(image, text)
            ranking, match_prob = log_p, log_p.exp()
            if image.log_sigma2 is None:  # point embeddings rank by cosine; p treats them as zero-variance Gaussians
                best_pair = image.mean.dim() == 3 or text.mean.dim() == 3
                ranking = (BestPairScore() if best_pair else CosineScore()).pairwise(image.mean, text.mean)
        if getattr(self.config, "ranking_score", None) == "cosine" and image.mean.dim() == 2 and text.mean.dim() == 2:
            ranking = CosineScore().pairwise(image.mean, text.mean)  # means trained to rank by their cosine
        return ranking, match_prob

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        positive_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        num_samples: int | None = None,
        return_dict: bool | None = None,
        generator: torch.Generator | None = None,
        **text_kwargs: Any,
    ) -> PCMEOutput | tuple:
        """Embed a batch of images and captions, score every pair, and optionally compute the loss.

        Args:
            positive_mask: ``(N_img, N_txt)`` bool, which pairs match; ``None`` = the diagonal
                (pair i is image i with caption i).
            labels: ``(N,)`` class ids, for the cross-modal centre loss.
            generator: draws the Monte-Carlo samples (images first, then captions); default: in
                eval mode ``config.inference_seed`` (the same as :meth:`get_image_features` and
                :meth:`get_text_features` called separately), in training mode fresh noise.
        """
        image_embeds = self.get_image_features(pixel_values, num_samples=num_samples, generator=generator)
        text_embeds = self.get_text_features(
            input_ids, attention_mask, num_samples=num_samples, generator=generator, **text_kwargs
        )
        logits, match_prob = self._pairwise(image_embeds, text_embeds)
        loss = components = None
        if return_loss:
            loss_output = self.compute_loss(image_embeds, text_embeds, positive_mask=positive_mask, labels=labels)
            loss, components = loss_output.loss, loss_output.components
        output = PCMEOutput(
            loss=loss,
            loss_components=components,
            logits_per_image=logits,
            logits_per_text=logits.t(),
            match_prob=match_prob.detach(),
            image_embeds=image_embeds,
            text_embeds=text_embeds,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def compute_loss(
        self,
        image_embeds: ProbabilisticEmbedding,
        text_embeds: ProbabilisticEmbedding,
        positive_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **loss_inputs: Any,
    ):
        """The configured loss on (possibly gathered) embeddings, with the model's a and b.

        ``loss_inputs`` (e.g. ``soft_targets``, ``partial_text``) go to the loss as they are; only
        the losses that declare them accept them.
        """
        return self.criterion(
            image_embeds,
            text_embeds,
            positive_mask,
            negative_scale=self.negative_scale,
            shift=self.shift,
            labels=labels,
            **loss_inputs,
        )


__all__ = [
    "BUILTIN_TOWERS",
    "PCMEModel",
    "PCMEPreTrainedModel",
    "PCMEOutput",
    "build_tower",
    "load_pretrained_tower",
    "missing_config_error",
    "StrictLoadingMixin",
    "tower_feature_dim",
    "tower_local_and_global",
]
