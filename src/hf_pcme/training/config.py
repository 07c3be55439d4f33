"""Training recipes: typed dataclasses loaded from YAML, with dotted ``key=value`` overrides.

A recipe is a YAML file with four sections (``model``, ``data``, ``train``, ``eval``) plus a few
top-level keys. Every key is checked against the dataclasses below *before* anything is built:
an unknown key or a value of the wrong type raises a ``ValueError`` that names the key and lists
the valid keys of its section (with a close match when there is one; :mod:`.recipe_schema`)::

    recipe = load_recipe("configs/shapes_pcme.yaml", ["train.max_steps=20", "output_dir=runs/x"])

Override values (:mod:`.recipe_yaml`) are parsed as YAML scalars (``20`` -> int, ``1e-4`` -> float, ``true`` -> bool,
``null`` -> None, ``[vision]`` -> list), so they have the same types as in the file. Dictionary
fields (``model.loss_kwargs``, ``data.options``) accept any key below them
(``model.loss_kwargs.vib_beta=1e-3``).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..configuration_pcme import PCMEConfig
from ..heads import HEADS
from ..losses import LOSSES
from ..registry import check_choice
from .recipe_schema import build_section
from .recipe_yaml import apply_overrides, parse_override, parse_yaml

#: PCMEConfig arguments the model section does not take as such: the towers are resolved by the
#: builder from ``vision_tower`` / ``vision_config`` (and the text ones).
_TOWER_ARGUMENTS = ("vision_config", "text_config")


def _pcme_config_arguments() -> list[tuple[str, Any, Any]]:
    """``(name, type, field)`` of each field :class:`~hf_pcme.PCMEConfig` declares itself, for the recipe.

    Derived rather than listed, so a new config field (a head or loss setting) is a recipe key with
    PCMEConfig's type and default, with no edit here. A mapping defaults to an empty one (PCMEConfig
    turns ``None`` into ``{}`` too), so dotted overrides such as ``model.loss_kwargs.vib_beta`` apply.
    """
    namespace = vars(sys.modules[PCMEConfig.__module__])
    defaults = {f.name: f.default for f in dataclasses.fields(PCMEConfig)}
    arguments = []
    for name, annotation in inspect.get_annotations(PCMEConfig).items():
        if name in _TOWER_ARGUMENTS:
            continue
        tp = eval(annotation, namespace) if isinstance(annotation, str) else annotation  # noqa: S307 - our own annotations
        default = field(default_factory=dict) if dict in typing.get_args(tp) else field(default=defaults[name])
        arguments.append((name, tp, default))
    return arguments


_PCMEConfigArguments = dataclasses.make_dataclass("_PCMEConfigArguments", _pcme_config_arguments())
_PCMEConfigArguments.__module__ = __name__

#: The model-section keys that are :class:`~hf_pcme.PCMEConfig` arguments (all but the towers).
PCME_CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(_PCMEConfigArguments))


@dataclass
class ModelRecipe(_PCMEConfigArguments):
    """How to build the :class:`~hf_pcme.PCMEModel`: every :class:`~hf_pcme.PCMEConfig` argument but the
    towers (``embed_dim``, ``head_type``, ``loss_type``, ``loss_kwargs``, ...: same names, types and
    defaults, checked by PCMEConfig itself) plus where the towers come from.

    Towers: ``vision_tower`` / ``text_tower`` name pretrained weights (a hub id such as
    ``microsoft/resnet-152`` or a local folder); without them the tower is built randomly
    initialised from ``vision_config`` / ``text_config`` (a dict with ``model_type``, e.g. a tiny
    ResNet, or ``{model_type: pcme_bigru}``). ``pretrained`` instead loads a whole saved PCME
    model (fine-tuning). The built-in bi-GRU text tower gets a word-level tokenizer built from the
    training captions unless ``tokenizer`` names one; ``word_embeddings`` is an optional GloVe
    text file (``word v1 ... v300`` per line) to initialise its word vectors.
    ``init_log_sigma2`` starts every log variance near this value (the bias of the uncertainty
    branch; ``None`` keeps the model's own initialisation, log variance ~ 0, as the original). Towers
    trained from scratch need it small (e.g. -5): with unit variances the sampling noise swamps the
    still nearly identical means and the binary match losses settle on a collapsed embedding.
    """

    pretrained: str | None = None
    vision_tower: str | None = None
    vision_config: dict | None = None
    text_tower: str | None = None
    text_config: dict | None = None
    tokenizer: str | None = None
    word_embeddings: str | None = None
    vocab_min_frequency: int = 1
    max_caption_length: int = 64
    # IMRAM re-ranker (hf_pcme.training.builders_imram): ``architecture: imram`` trains an IMRAMModel on
    # the towers of the dual encoder in ``pretrained`` (or on new towers); ``imram`` holds IMRAMConfig fields.
    architecture: Literal["pcme", "imram"] = "pcme"
    imram: dict = field(default_factory=dict)


def pcme_config_kwargs(model: ModelRecipe) -> dict[str, Any]:
    """The :class:`~hf_pcme.PCMEConfig` keyword arguments of a model recipe (all but the towers)."""
    return {name: getattr(model, name) for name in PCME_CONFIG_FIELDS}


@dataclass
class DataRecipe:
    """Which dataset and how to feed it.

    ``name`` is passed to ``hf_pcme.data.load_dataset_by_name`` with ``data_dir`` and
    ``options`` (dataset-specific keyword arguments, e.g. the sizes of the generated shapes set).
    ``sampler``: ``random`` (shuffled pairs) or ``class_balanced`` (CUB: one caption per class
    in a batch, as in PCME). Without ``augment``, ``cache_pixel_values`` processes each distinct
    training image once and keeps the tensors in memory (in each process) when they take at most
    ``pixel_cache_max_gb``; otherwise images are decoded and processed for every batch.
    """

    name: str = "shapes"
    data_dir: str | None = None
    options: dict = field(default_factory=dict)
    train_split: str = "train"
    eval_split: str = "val"
    image_size: int = 224
    augment: bool = True
    num_workers: int = 0
    sampler: Literal["random", "class_balanced"] = "random"
    cache_pixel_values: bool = True
    pixel_cache_max_gb: float = 2.0


@dataclass
class TrainRecipe:
    """The optimisation schedule.

    ``batch_size`` is the *global* batch of one forward pass (the contrastive loss sees all of
    it, whatever the number of processes; it must be divisible by the number of processes);
    an optimiser step sees ``batch_size * grad_accum`` pairs. Training runs in two phases:
    phase 1 with the towers listed in ``phase1_frozen`` frozen, phase 2 with everything
    trained (each phase: its own AdamW / AdamP and linear warmup + cosine decay). Phase
    lengths are in epochs, or in optimiser steps when ``phase1_steps`` / ``phase2_steps`` are
    set; ``max_steps`` caps the total. (To end a run early from code, pass a callback to
    ``train``: ``hf_pcme.training.callbacks``.)
    ``find_unused_parameters`` is passed to DDP (needed only if some trainable parameter does not
    reach the loss).

    Uncertainty recipes (``hf_pcme.training.augment``, docs/uncertainty.md): ``freeze_uncertainty`` fixes every
    log variance at ``model.init_log_sigma2`` (the "without uncertainty" ablation);
    ``duplicate_caption_positives`` makes captions with identical text positives of each other's
    images; ``duplicate_caption_inclusion`` does so for the ``prolip`` / ``infonce_inclusion`` inclusion term only (the
    matching loss keeps its positives); ``mix_batch_ratio`` mixes that fraction of the images (PCME++ mixup / cutmix, soft
    targets); ``partial_caption_ratio`` / ``word_drop_prob`` make word-dropped captions for the
    ``prolip`` inclusion loss; ``uncertainty_lr_multiplier`` scales the learning rate of the
    heads' uncertainty branches.

    ``modality_classifier`` adds GPLDAN's adversarial modality classifier (see
    ``hf_pcme.training.adversarial``): gradient-reversal coefficient ``modality_classifier_weight``
    (default 1) reached over ``modality_classifier_ramp_steps`` forward passes (schedule ``dann``) or
    at once (``constant``).
    """

    batch_size: int = 128
    lr: float = 2e-4
    phase2_lr_multiplier: float = 1.0
    tower_lr_multiplier: float = 1.0
    weight_decay: float = 1e-4
    optimizer: Literal["auto", "adamw", "adamp"] = "auto"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    phase1_epochs: float = 0.0
    phase2_epochs: float = 1.0
    phase1_steps: int | None = None
    phase2_steps: int | None = None
    phase1_frozen: list[Literal["vision", "text", "word_embeddings"]] = field(
        default_factory=lambda: ["vision", "word_embeddings"]
    )
    max_steps: int | None = None
    grad_clip: float | None = 2.0
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    diagonal_positives_only: bool = False
    find_unused_parameters: bool = False
    checkpoint_every: int = 1000
    keep_last: int = 2
    eval_every: int = 0
    best_metric: str = "rsum"
    greater_is_better: bool = True
    load_best_at_end: bool = False
    log_every: int = 10
    freeze_uncertainty: bool = False
    duplicate_caption_positives: bool = False
    duplicate_caption_inclusion: bool = False
    mix_batch_ratio: float = 0.0
    partial_caption_ratio: float = 0.0
    word_drop_prob: float = 0.5
    uncertainty_lr_multiplier: float = 1.0
    modality_classifier: bool = False
    modality_classifier_hidden_dim: int = 64
    modality_classifier_weight: float | None = None
    modality_classifier_schedule: Literal["constant", "dann"] = "dann"
    modality_classifier_ramp_steps: int = 1000


@dataclass
class EvalRecipe:
    """Periodic validation: R@K and PMRP on ``data.eval_split`` (at most ``max_images`` images).

    ``ranking`` overrides how pairs are scored (default: the model's own score: cosine for points,
    the best pair for PVSE, CSD or the sampled match probability for Gaussians); ``num_samples``
    is J for the sampled score (default: the model's).
    """

    enabled: bool = True
    batch_size: int = 256
    max_images: int | None = None
    num_samples: int | None = None
    ranking: str | None = None  # a name in hf_pcme.metrics.SCORERS


@dataclass
class StageRecipe:
    """One stage of a multi-stage recipe (``stages:``), e.g. webly supervised training: web images
    with tags first, then clean captions (``configs/shapes_webly.yaml``).

    ``data`` holds the keys of the top-level ``data`` section that this stage changes (each given
    key replaces the top-level value; ``options`` is replaced as a whole, not merged). The length
    is ``epochs`` of this stage's data, or ``steps`` optimiser steps when set (as for the phases
    of ``train``); ``lr`` defaults to ``train.lr``; ``frozen`` lists the parts kept frozen.
    """

    name: str = ""
    data: dict = field(default_factory=dict)
    epochs: float = 1.0
    steps: int | None = None
    lr: float | None = None
    frozen: list[Literal["vision", "text", "word_embeddings"]] = field(default_factory=list)


@dataclass
class Recipe:
    """A complete training recipe (see ``configs/*.yaml``).

    With ``stages`` (a list of :class:`StageRecipe`), the run trains stage after stage, each on its
    own data, instead of the two phases of ``train``; the top-level ``data`` section is then the
    evaluation data and the defaults each stage starts from.
    """

    name: str = "pcme"
    output_dir: str = "runs/pcme"
    seed: int = 0
    logging: Literal["auto", "tensorboard", "jsonl"] = "auto"
    model: ModelRecipe = field(default_factory=ModelRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    eval: EvalRecipe = field(default_factory=EvalRecipe)
    stages: list[StageRecipe] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A plain nested dict (YAML / JSON serialisable)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The recipe as YAML text; ``load_recipe`` reads it back to an equal recipe."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")


# ---------------------------------------------------------------------------------------- checking
def _check_model(model: ModelRecipe) -> None:
    """Names against their registries, then PCMEConfig's own checks on the model section (default towers)."""
    # The registries are the one list of choices: a new head or loss is one file plus one registry line.
    check_choice(model.head_type, HEADS, "recipe key 'model.head_type':")
    check_choice(model.loss_type, LOSSES, "recipe key 'model.loss_type':")
    try:
        PCMEConfig(**pcme_config_kwargs(model))
    except (TypeError, ValueError) as error:
        message = str(error)
        named = [(message.find(name), name) for name in PCME_CONFIG_FIELDS if re.search(rf"\b{name}\b", message)]
        where = f"key 'model.{min(named)[1]}'" if named else "section 'model'"
        raise ValueError(f"Recipe {where}: {message}") from None
    if model.max_caption_length < 1:
        raise ValueError(f"Recipe key 'model.max_caption_length' must be >= 1, got {model.max_caption_length}.")
    if model.pretrained is None and model.vision_tower is None and model.vision_config is None:
        raise ValueError("The recipe names no image tower: set 'model.vision_tower' (hub id or folder), "
                         "'model.vision_config' (a dict with model_type) or 'model.pretrained'.")


def _check_ranges(recipe: Recipe) -> None:
    """Bounds that types alone cannot express: ``(key, value, low, high)``, ``None`` values skipped."""
    train, data = recipe.train, recipe.data
    at_least_one = ("batch_size", "grad_accum", "checkpoint_every", "keep_last", "log_every")
    non_negative = ("lr", "phase2_lr_multiplier", "tower_lr_multiplier", "uncertainty_lr_multiplier", "weight_decay",
                    "warmup_steps", "phase1_epochs", "phase2_epochs", "eval_every", "phase1_steps", "phase2_steps",
                    "max_steps")
    bounds = [(f"train.{name}", getattr(train, name), 1, None) for name in at_least_one]
    bounds += [("eval.batch_size", recipe.eval.batch_size, 1, None), ("data.image_size", data.image_size, 1, None)]
    bounds += [(f"train.{name}", getattr(train, name), 0, None) for name in non_negative]
    bounds += [("data.num_workers", data.num_workers, 0, None), ("data.pixel_cache_max_gb", data.pixel_cache_max_gb, 0, None)]
    bounds += [(f"train.{name}", getattr(train, name), 0.0, 1.0)
               for name in ("mix_batch_ratio", "partial_caption_ratio", "min_lr_ratio")]
    if train.modality_classifier:
        bounds += [(f"train.{name}", getattr(train, name), 1, None)
                   for name in ("modality_classifier_hidden_dim", "modality_classifier_ramp_steps")]
        bounds += [("train.modality_classifier_weight", train.modality_classifier_weight, 0, None)]
    for index, stage in enumerate(recipe.stages):
        bounds += [(f"stages[{index}].{name}", getattr(stage, name), 0, None) for name in ("epochs", "steps", "lr")]
    for key, value, low, high in bounds:
        if value is not None and high is None and value < low:
            raise ValueError(f"Recipe key {key!r} must be >= {low}, got {value}.")
        if value is not None and high is not None and not low <= value <= high:
            raise ValueError(f"Recipe key {key!r} must be in [{low:g}, {high:g}], got {value}.")
    if not 0.0 <= train.word_drop_prob < 1.0:
        raise ValueError(f"Recipe key 'train.word_drop_prob' must be in [0, 1), got {train.word_drop_prob}.")
    if train.grad_clip is not None and train.grad_clip <= 0:
        raise ValueError("Recipe key 'train.grad_clip' must be > 0, or null for no clipping.")


def _validate_values(recipe: Recipe) -> None:
    """Checks that types alone cannot express: names, ranges, and keys that only make sense together."""
    _check_model(recipe.model)
    _check_ranges(recipe)
    if recipe.eval.ranking is not None:
        from ..metrics.scorers import SCORERS  # the evaluation ranks through this registry

        check_choice(recipe.eval.ranking, SCORERS, "recipe key 'eval.ranking':")
    train, model = recipe.train, recipe.model
    if train.duplicate_caption_inclusion and model.loss_type not in ("prolip", "infonce_inclusion"):
        raise ValueError("Recipe key 'train.duplicate_caption_inclusion' acts on the inclusion term of "
                         f"model.loss_type 'prolip' or 'infonce_inclusion', but the loss is {model.loss_type!r}: "
                         "use one of those or remove the key.")
    if train.freeze_uncertainty and model.head_type != "probabilistic":
        raise ValueError("Recipe key 'train.freeze_uncertainty' needs model.head_type 'probabilistic' "
                         f"(a {model.head_type!r} head has no variance).")
    if train.modality_classifier_weight is not None and not train.modality_classifier:
        raise ValueError(
            "Recipe key 'train.modality_classifier_weight' is set but 'train.modality_classifier' is false: "
            "enable the modality classifier (train.modality_classifier=true) or remove the weight."
        )
    for index in range(len(recipe.stages)):
        stage_data(recipe, index)  # unknown or mistyped data keys fail here, naming the stage


def stage_data(recipe: Recipe, index: int) -> DataRecipe:
    """The data section of stage ``index``: the top-level ``data`` with the stage's keys replaced."""
    values = {**dataclasses.asdict(recipe.data), **recipe.stages[index].data}
    return build_section(DataRecipe, values, f"stages[{index}].data")


# ---------------------------------------------------------------------------------------- loading
def recipe_from_dict(values: dict[str, Any] | None) -> Recipe:
    """Check a nested dict against :class:`Recipe` and build it; ``ValueError`` names any bad key."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"A recipe must be a mapping of keys, got {type(values).__name__}.")
    recipe = build_section(Recipe, values, "")
    _validate_values(recipe)
    return recipe


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a YAML recipe (or the defaults when ``path`` is None) and apply dotted overrides.

    Raises:
        ValueError: unknown key, wrong type or out-of-range value (the key is named), or a
            missing / unparsable file.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"Recipe file {str(path)!r} does not exist.")
        try:
            values = parse_yaml(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"Recipe file {str(path)!r} is not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"Recipe file {str(path)!r} must hold a mapping of keys.")
    return recipe_from_dict(apply_overrides(values, list(overrides)))


__all__ = [
    "DataRecipe",
    "EvalRecipe",
    "ModelRecipe",
    "PCME_CONFIG_FIELDS",
    "Recipe",
    "StageRecipe",
    "TrainRecipe",
    "apply_overrides",
    "load_recipe",
    "parse_override",
    "parse_yaml",
    "pcme_config_kwargs",
    "recipe_from_dict",
    "stage_data",
]
