"""Training recipes: typed dataclasses loaded from YAML, with dotted ``key=value`` overrides.

A recipe is a YAML file with four sections (``model``, ``data``, ``train``, ``eval``) plus a few
top-level keys. Every key is checked against the dataclasses below *before* anything is built:
an unknown key or a value of the wrong type raises a ``ValueError`` that names the key and lists
the valid keys of its section (with a close match when there is one)::

    recipe = load_recipe("configs/shapes_pcme.yaml", ["train.max_steps=20", "output_dir=runs/x"])

Override values are parsed as YAML scalars (``20`` -> int, ``1e-4`` -> float, ``true`` -> bool,
``null`` -> None, ``[vision]`` -> list), so they have the same types as in the file. Dictionary
fields (``model.loss_kwargs``, ``data.options``) accept any key below them
(``model.loss_kwargs.vib_beta=1e-3``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..configuration_pcme import MATCH_FUNCTIONS
from ..heads import HEADS
from ..losses import LOSSES
from ..registry import check_choice


class _RecipeLoader(yaml.SafeLoader):
    """YAML loader that also reads ``1e-4`` as a float (YAML 1.1, and so PyYAML, needs ``1.0e-4``)."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML text with the recipe loader (``1e-4`` is a float)."""
    return yaml.load(text, Loader=_RecipeLoader)


@dataclass
class ModelRecipe:
    """How to build the :class:`~hf_pcme.PCMEModel` (fields of :class:`~hf_pcme.PCMEConfig` plus where towers come from).

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
    embed_dim: int = 1024
    head_type: str = "probabilistic"  # a name in hf_pcme.heads.HEADS
    num_embeds: int = 2
    num_samples: int = 7
    attention_hidden_dim: int | None = None
    head_dropout: float = 0.0
    loss_type: str = "pcme"  # a name in hf_pcme.losses.LOSSES
    loss_kwargs: dict = field(default_factory=dict)
    init_negative_scale: float = 15.0
    init_shift: float = 15.0
    init_log_sigma2: float | None = None
    match_function: str = "sampled"  # a name in hf_pcme.configuration_pcme.MATCH_FUNCTIONS
    ranking_score: str | None = None  # PCMEConfig.ranking_score: None = from head_type / match_function, or cosine
    # IMRAM re-ranker (hf_pcme.training.builders_imram): ``architecture: imram`` trains an IMRAMModel on
    # the towers of the dual encoder in ``pretrained`` (or on new towers); ``imram`` holds IMRAMConfig fields.
    architecture: Literal["pcme", "imram"] = "pcme"
    imram: dict = field(default_factory=dict)


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
    ranking: Literal["cosine", "csd", "sampled", "polysemous"] | None = None


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
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(item)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting int -> float); raise naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"Recipe key {key!r} must be a mapping of its keys, got {value!r}.")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except ValueError as error:
                errors.append(error)
        raise ValueError(f"Recipe key {key!r} must be {_type_name(tp)}, got {value!r} ({type(value).__name__}).")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value is False and "no" in choices:
            return "no"  # YAML 1.1 reads a bare `no` as false (mixed_precision: no)
        if value in choices and not isinstance(value, bool):
            return value
        raise ValueError(f"Recipe key {key!r} must be {_type_name(tp)}, got {value!r}.")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"Recipe key {key!r} must be {_type_name(tp)}, got {value!r} ({type(value).__name__}).")
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    else:  # pragma: no cover - only the annotations above are used in this module
        raise TypeError(f"Unsupported recipe annotation {tp!r} for {key!r}.")
    raise ValueError(f"Recipe key {key!r} must be {_type_name(tp)}, got {value!r} ({type(value).__name__}).")


def _unknown_key_error(section: str, name: str, valid: list[str]) -> ValueError:
    full = f"{section}.{name}" if section else name
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {(f'{section}.{close[0]}' if section else close[0])!r}?" if close else ""
    where = f"section {section!r}" if section else "the top level"
    return ValueError(f"Unknown recipe key {full!r}.{hint} Valid keys of {where} are: {', '.join(valid)}.")


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        if name not in hints or name not in valid:
            raise _unknown_key_error(section, str(name), valid)
        key = f"{section}.{name}" if section else name
        kwargs[name] = _convert(value, hints[name], key)
    return cls(**kwargs)


def _validate_values(recipe: Recipe) -> None:
    """Range checks that types alone cannot express, and names checked against their registries."""
    # The registries are the one list of choices: a new head, loss or match function is one file plus
    # one registry line, and recipes accept it without an edit here.
    for key, registry, value in (
        ("model.head_type", HEADS, recipe.model.head_type),
        ("model.loss_type", LOSSES, recipe.model.loss_type),
        ("model.match_function", MATCH_FUNCTIONS, recipe.model.match_function),
    ):
        check_choice(value, registry, f"recipe key {key!r}:")
    positive = {
        "train.batch_size": recipe.train.batch_size,
        "train.grad_accum": recipe.train.grad_accum,
        "train.checkpoint_every": recipe.train.checkpoint_every,
        "train.keep_last": recipe.train.keep_last,
        "train.log_every": recipe.train.log_every,
        "eval.batch_size": recipe.eval.batch_size,
        "model.embed_dim": recipe.model.embed_dim,
        "model.num_samples": recipe.model.num_samples,
        "model.num_embeds": recipe.model.num_embeds,
        "model.max_caption_length": recipe.model.max_caption_length,
        "data.image_size": recipe.data.image_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ValueError(f"Recipe key {key!r} must be >= 1, got {value}.")
    non_negative = {
        "train.lr": recipe.train.lr,
        "train.phase2_lr_multiplier": recipe.train.phase2_lr_multiplier,
        "train.tower_lr_multiplier": recipe.train.tower_lr_multiplier,
        "train.uncertainty_lr_multiplier": recipe.train.uncertainty_lr_multiplier,
        "train.weight_decay": recipe.train.weight_decay,
        "train.warmup_steps": recipe.train.warmup_steps,
        "train.phase1_epochs": recipe.train.phase1_epochs,
        "train.phase2_epochs": recipe.train.phase2_epochs,
        "train.eval_every": recipe.train.eval_every,
        "data.num_workers": recipe.data.num_workers,
        "data.pixel_cache_max_gb": recipe.data.pixel_cache_max_gb,
    }
    for key in ("phase1_steps", "phase2_steps", "max_steps"):
        if getattr(recipe.train, key) is not None:
            non_negative[f"train.{key}"] = getattr(recipe.train, key)
    for key, value in non_negative.items():
        if value < 0:
            raise ValueError(f"Recipe key {key!r} must be >= 0, got {value}.")
    for key in ("mix_batch_ratio", "partial_caption_ratio"):
        if not 0.0 <= getattr(recipe.train, key) <= 1.0:
            raise ValueError(f"Recipe key 'train.{key}' must be in [0, 1], got {getattr(recipe.train, key)}.")
    if not 0.0 <= recipe.train.word_drop_prob < 1.0:
        raise ValueError(f"Recipe key 'train.word_drop_prob' must be in [0, 1), got {recipe.train.word_drop_prob}.")
    if recipe.train.duplicate_caption_inclusion and recipe.model.loss_type not in ("prolip", "infonce_inclusion"):
        raise ValueError("Recipe key 'train.duplicate_caption_inclusion' acts on the inclusion term of "
                         f"model.loss_type 'prolip' or 'infonce_inclusion', but the loss is {recipe.model.loss_type!r}: "
                         "use one of those or remove the key.")
    if recipe.train.freeze_uncertainty and recipe.model.head_type != "probabilistic":
        raise ValueError("Recipe key 'train.freeze_uncertainty' needs model.head_type 'probabilistic' "
                         f"(a {recipe.model.head_type!r} head has no variance).")
    if not 0.0 <= recipe.train.min_lr_ratio <= 1.0:
        raise ValueError(f"Recipe key 'train.min_lr_ratio' must be in [0, 1], got {recipe.train.min_lr_ratio}.")
    if recipe.train.grad_clip is not None and recipe.train.grad_clip <= 0:
        raise ValueError("Recipe key 'train.grad_clip' must be > 0, or null for no clipping.")
    if recipe.train.modality_classifier_weight is not None and not recipe.train.modality_classifier:
        raise ValueError(
            "Recipe key 'train.modality_classifier_weight' is set but 'train.modality_classifier' is false: "
            "enable the modality classifier (train.modality_classifier=true) or remove the weight."
        )
    if recipe.train.modality_classifier:
        for key in ("modality_classifier_hidden_dim", "modality_classifier_ramp_steps"):
            if getattr(recipe.train, key) < 1:
                raise ValueError(f"Recipe key 'train.{key}' must be >= 1, got {getattr(recipe.train, key)}.")
        if (recipe.train.modality_classifier_weight or 0.0) < 0:
            raise ValueError("Recipe key 'train.modality_classifier_weight' must be >= 0.")
    for index, stage in enumerate(recipe.stages):
        stage_data(recipe, index)  # unknown or mistyped data keys fail here, naming the stage
        key = f"stages[{index}]"
        for name in ("epochs", "steps", "lr"):
            value = getattr(stage, name)
            if value is not None and value < 0:
                raise ValueError(f"Recipe key '{key}.{name}' must be >= 0, got {value}.")
    if recipe.model.pretrained is None and recipe.model.vision_tower is None and recipe.model.vision_config is None:
        raise ValueError("The recipe names no image tower: set 'model.vision_tower' (hub id or folder), "
                         "'model.vision_config' (a dict with model_type) or 'model.pretrained'.")


def stage_data(recipe: Recipe, index: int) -> DataRecipe:
    """The data section of stage ``index``: the top-level ``data`` with the stage's keys replaced."""
    values = {**dataclasses.asdict(recipe.data), **recipe.stages[index].data}
    return _build(DataRecipe, values, f"stages[{index}].data")


# ---------------------------------------------------------------------------------------- loading
def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b.c=value"`` into ``(["a", "b", "c"], parsed value)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"Override {text!r} must look like 'section.key=value' (e.g. train.max_steps=20).")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"Override {text!r} has an empty key; write 'section.key=value'.")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ValueError(f"Override {text!r}: cannot parse the value {raw!r} as YAML ({error}).") from None
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the nested ``values`` with each dotted ``key=value`` override set."""
    import copy

    values = copy.deepcopy(values)
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for depth, part in enumerate(path[:-1]):
            if isinstance(node, list):  # a list section (stages): the part is an index
                node = _list_item(node, part, text)
                continue
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, (dict, list)):
                raise ValueError(f"Override {text!r}: {'.'.join(path[: depth + 1])!r} is not a section.")
            node = child
        if isinstance(node, list):
            node[_list_index(node, path[-1], text)] = value
        else:
            node[path[-1]] = value
    return values


def _list_index(items: list, part: str, text: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ValueError(f"Override {text!r}: {part!r} is not an index of a list of {len(items)} item(s).")
    return int(part)


def _list_item(items: list, part: str, text: str) -> dict:
    item = items[_list_index(items, part, text)]
    if not isinstance(item, dict):
        raise ValueError(f"Override {text!r}: item {part} is not a section.")
    return item


def recipe_from_dict(values: dict[str, Any] | None) -> Recipe:
    """Check a nested dict against :class:`Recipe` and build it; ``ValueError`` names any bad key."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"A recipe must be a mapping of keys, got {type(values).__name__}.")
    recipe = _build(Recipe, values, "")
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
    "Recipe",
    "StageRecipe",
    "TrainRecipe",
    "apply_overrides",
    "load_recipe",
    "parse_override",
    "parse_yaml",
    "recipe_from_dict",
    "stage_data",
]
