"""Model card (README.md) of a trained model, filled from ``model_cards/template.md``.

The template is package data (``hf_pcme/training/model_card_template.md``, which the repository's
``model_cards/template.md`` links to), so an installed package writes cards without a checkout.

The card's YAML front matter carries ``model-index`` metadata (one result entry per metric, task
``cross-modal-retrieval``) built with ``huggingface_hub.ModelCardData`` / ``EvalResult``, so the Hub
shows the scores; the body gives the towers, the recipe, intended use and limitations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..evaluation import TASK_NAME, TASK_TYPE, metric_display_name  # noqa: F401  (re-exported)
from ..heads import MULTI_EMBEDDING_HEADS
from .config import Recipe, stage_data

#: The template shipped inside the package (``model_cards/template.md`` in the repository links here).
DEFAULT_TEMPLATE = Path(__file__).resolve().with_name("model_card_template.md")

_DATASET_NAMES = {"coco": "MS-COCO (Karpathy split)", "cub": "CUB-200-2011 captions", "shapes": "Synthetic shapes"}
_DATASET_NAMES.update({"flickr30k": "Flickr30K (Karpathy split)", "shapes_web": "Synthetic shapes with noisy tags"})


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def results_table(metrics: dict[str, Any]) -> str:
    """A markdown table of the metrics: one row per metric name, i2t and t2i side by side."""
    metrics = _numeric(metrics)
    if not metrics:
        return "_No evaluation results were recorded for this model._"
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        protocol, _, rest = key.rpartition("/")
        direction, _, name = rest.partition("_")
        prefix = f"{protocol}/" if protocol else ""
        if direction in ("i2t", "t2i") and name:
            rows.setdefault(prefix + name, {})[direction] = value
        else:
            rows.setdefault(key, {})["all"] = value
    lines = ["| metric | i2t | t2i | overall |", "|---|---|---|---|"]
    for name, cells in rows.items():
        fmt = [f"{cells[c]:.2f}" if c in cells else "" for c in ("i2t", "t2i", "all")]
        lines.append(f"| {metric_display_name(name)} | " + " | ".join(fmt) + " |")
    return "\n".join(lines)


def describe_stage_data(recipe: Recipe, index: int) -> str:
    """``"shapes_web (num_images=4000, seed=1)"``: the dataset of stage ``index``, for logs and the card."""
    data = stage_data(recipe, index)
    details = [f"data_dir={data.data_dir}"] if data.data_dir else []
    details += [f"{key}={value}" for key, value in data.options.items() if key != "cache_dir"]
    return f"{data.name} ({', '.join(details)})" if details else data.name


def _dataset_ids(recipe: Recipe) -> list[str]:
    """Dataset names for the card's metadata: every stage's, then the evaluation data's (Hub ids for ``hub``)."""
    sections = [stage_data(recipe, index) for index in range(len(recipe.stages))] + [recipe.data]
    ids = [data.data_dir if data.name == "hub" and data.data_dir else data.name for data in sections]
    return list(dict.fromkeys(ids))


def stages_markdown(recipe: Recipe) -> str | None:
    """A numbered list of the training stages (dataset, length, learning rate, frozen parts), or None."""
    if not recipe.stages:
        return None
    lines = [f"Trained in {len(recipe.stages)} stages, in this order:", ""]
    for index, stage in enumerate(recipe.stages):
        length = f"{stage.steps} steps" if stage.steps is not None else f"{stage.epochs:g} epochs"
        lr = recipe.train.lr if stage.lr is None else stage.lr
        lines.append(
            f"{index + 1}. **{stage.name or f'stage {index + 1}'}**: `{describe_stage_data(recipe, index)}`, {length}, "
            f"learning rate {lr:g}, frozen: {', '.join(stage.frozen) or 'nothing'}."
        )
    return "\n".join(lines)


def _tower_text(name: str | None, config: dict | None, default: str) -> str:
    if name:
        return f"`{name}` (pretrained)"
    if config:
        return f"`{config.get('model_type', default)}` (trained from scratch)"
    return f"`{default}` (trained from scratch)"


_EMBEDDING_SUMMARIES = {
    "probabilistic": "A probabilistic cross-modal embedding (PCME, Chun et al. CVPR 2021): each input is a "
    "Gaussian whose variance is meant to express ambiguity (check the evaluation before relying on it), "
    "and a pair's match probability accounts for both uncertainties.",
    "deterministic": "A deterministic dual encoder (one point per input), trained as a baseline for "
    "probabilistic embeddings.",
    "polysemous": "A polysemous visual-semantic embedding (PVSE, Song & Soleymani CVPR 2019): K points per input.",
    "diversified_attention": "A diversified attention network (GPLDAN, Chen et al. ICIP 2020): K points per input "
    "from K attention maps that interact.",
}


def _card_data(recipe: Recipe, metrics: dict[str, float], model_name: str, dataset_name: str, split: str) -> ModelCardData:
    """The card's YAML front matter: tags, datasets, base models and one ``model-index`` result per metric."""
    model = recipe.model
    eval_results = [
        EvalResult(
            task_type=TASK_TYPE,
            task_name=TASK_NAME,
            dataset_type=recipe.data.name,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=key,
            metric_name=metric_display_name(key),
            metric_value=round(value, 4),
        )
        for key, value in metrics.items()
    ]
    tags = ["hf_pcme", "pcme", "cross-modal-retrieval", "image-text-retrieval", model.loss_type, model.head_type]
    return ModelCardData(
        model_name=model_name,
        library_name="transformers",
        license="apache-2.0",
        tags=list(dict.fromkeys(tags)),
        datasets=_dataset_ids(recipe),
        metrics=sorted({key.rpartition("/")[2].partition("_")[2] or key.rpartition("/")[2] for key in metrics}) or None,
        eval_results=eval_results or None,
        base_model=[m for m in (model.vision_tower, model.text_tower) if m and not Path(m).exists()] or None,
    )


def _embedding_text(recipe: Recipe) -> dict[str, str]:
    """What the card says about the embedding: its kind, how pairs are matched, a one-paragraph summary."""
    model = recipe.model
    embedding_kind = {
        "probabilistic": "Gaussian distribution (a mean and a per-dimension variance)",
        "deterministic": "point",
        "polysemous": f"set of {model.num_embeds} points",
        "diversified_attention": f"set of {model.num_embeds} points",
    }[model.head_type]
    if model.head_type == "probabilistic":
        match_text = (
            "closed-form sampled distance (PCME++)"
            if model.match_function == "csd"
            else f"Monte-Carlo match probability over J = {model.num_samples} samples per item (PCME)"
        )
    else:
        match_text = "cosine similarity of the embeddings" + (" (best of K x K pairs)" if model.head_type in MULTI_EMBEDDING_HEADS else "")
    return {"embedding_kind": embedding_kind, "match_function_text": match_text,
            "model_summary": _EMBEDDING_SUMMARIES[model.head_type]}


def _default_training_summary(recipe: Recipe) -> str:
    train = recipe.train
    return (
        f"Two phases: phase 1 with the {', '.join(train.phase1_frozen) or 'no'} tower(s) frozen, then all "
        f"parameters fine-tuned. Global batch {train.batch_size} x {train.grad_accum} accumulation step(s), "
        f"learning rate {train.lr:g} with {train.warmup_steps} warmup steps and cosine decay, weight decay "
        f"{train.weight_decay:g}, gradient clipping {train.grad_clip}, mixed precision `{train.mixed_precision}`."
    )


def build_model_card(
    recipe: Recipe,
    metrics: dict[str, Any] | None = None,
    *,
    repo_id: str | None = None,
    dataset_split: str | None = None,
    eval_protocol: str | None = None,
    training_summary: str | None = None,
    template_path: str | Path | None = None,
) -> ModelCard:
    """Fill the model card template for a model trained with ``recipe``.

    Args:
        recipe: the training recipe (written into the card).
        metrics: flat evaluation results in percent (``{"i2t_R@1": 68.8, "t2i_pmrp": 46.0, ...}``);
            each becomes a ``model-index`` result.
        repo_id: Hub id or folder used in the usage snippet (default: the recipe's ``output_dir``).
        dataset_split: split the metrics were computed on (default: ``recipe.data.eval_split``).
        training_summary: a paragraph about the run (steps, time, hardware).
        template_path: a Jinja template (default: ``model_cards/template.md``).
    """
    template_path = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE
    if not template_path.is_file():
        raise ValueError(f"Model card template {str(template_path)!r} does not exist; pass template_path.")
    metrics = _numeric(metrics or {})
    model = recipe.model
    dataset_split = dataset_split or recipe.data.eval_split
    dataset_name = _DATASET_NAMES.get(recipe.data.name, recipe.data.name)
    model_name = repo_id.split("/")[-1] if repo_id else recipe.name
    return ModelCard.from_template(
        _card_data(recipe, metrics, model_name, dataset_name, dataset_split),
        template_path=str(template_path),
        model_name=model_name,
        recipe_name=recipe.name,
        embed_dim=model.embed_dim,
        vision_tower=_tower_text(model.vision_tower or model.pretrained, model.vision_config, "resnet"),
        text_tower=_tower_text(model.text_tower or model.pretrained, model.text_config, "pcme_bigru"),
        head_type=model.head_type,
        num_embeds=model.num_embeds,
        loss_type=model.loss_type,
        repo_id=repo_id or recipe.output_dir,
        dataset_name=dataset_name,
        dataset_split=dataset_split,
        eval_protocol=eval_protocol,
        results_table=results_table(metrics),
        training_summary=training_summary or _default_training_summary(recipe),
        training_stages=stages_markdown(recipe),
        recipe_yaml=recipe.to_yaml().rstrip(),
        input_limits=f"images are resized to {recipe.data.image_size} px and captions cut at "
        f"{model.max_caption_length} tokens",
        extra_limitations=(
            "Trained on synthetic shapes: a demonstration model, not for natural images."
            if recipe.data.name in ("shapes", "shapes_web")
            else None
        ),
        **_embedding_text(recipe),
    )


def write_model_card(directory: str | Path, recipe: Recipe, metrics: dict[str, Any] | None = None, **kwargs: Any) -> Path:
    """Build the card (see :func:`build_model_card`) and save it as ``<directory>/README.md``."""
    path = Path(directory) / "README.md"
    if recipe.model.architecture == "imram":
        from .model_card_imram import build_imram_model_card

        build_imram_model_card(recipe, metrics, **kwargs).save(path)
        return path
    build_model_card(recipe, metrics, **kwargs).save(path)
    return path


__all__ = ["build_model_card", "metric_display_name", "results_table", "write_model_card"]
