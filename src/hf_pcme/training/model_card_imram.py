"""The model card of an IMRAM re-ranker trained with ``model.architecture: imram``."""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .config import Recipe


def _loss_description(options: dict[str, Any]) -> str:
    """One sentence: the triplet loss of the recipe (hardest negative or sum, warm-up, mined negatives, duplicates)."""
    hardest = options.get("max_violation", True)
    loss = "Hardest-negative" if hardest else "Sum-over-negatives"
    text = f"{loss} triplet loss (margin {options.get('margin', 0.2)}) over every image-caption pair of the batch"
    warmup = int(options.get("hardest_negative_warmup_steps", 0))
    if hardest and warmup:
        text += f", summed over the negatives for the first {warmup} steps"
    mined = int(options.get("mined_negatives", 0))
    if mined:
        text += (f"; each query also gets {mined} negatives per step drawn from its top "
                 f"{options.get('mining_top_k', 50)} non-positives by the frozen dual encoder")
    if options.get("duplicate_caption_positives"):
        text += "; training captions with the same text as a positive are positives, not negatives"
    return text + "."


def build_imram_model_card(recipe: Recipe, metrics: dict[str, Any] | None = None, *, repo_id: str | None = None,
                           training_summary: str | None = None, **_: Any) -> ModelCard:
    """A short card: what the re-ranker is, which dual encoder it belongs to, how to use it, the recipe."""
    options = recipe.model.imram
    name = repo_id.split("/")[-1] if repo_id else recipe.name
    folder = repo_id or recipe.output_dir
    data = ModelCardData(model_name=name, library_name="transformers", license="apache-2.0", datasets=[recipe.data.name],
                         tags=["hf_pcme", "imram", "cross-modal-retrieval", "image-text-retrieval", "reranker"])
    dual_encoder = recipe.model.pretrained or "its own towers (trained with it)"
    text = f"""---
{data.to_yaml()}
---

# {name}

An IMRAM re-ranker (Chen et al., CVPR 2020, "IMRAM: Iterative Matching with Recurrent Attention Memory
for Cross-Modal Image-Text Retrieval"), trained with the `hf_pcme` package (`{recipe.name}` recipe). It
scores an (image, caption) pair by aligning image regions and words over
{options.get("num_steps", 3)} step(s) (variant `{options.get("variant", "full")}`), and is meant to
re-rank the top-K of the dual encoder `{dual_encoder}`, whose towers it uses.

## How to use

```python
import hf_pcme
from transformers import pipeline

retriever = pipeline("cross-modal-retrieval", model="{recipe.model.pretrained or 'DUAL_ENCODER'}", reranker="{folder}", rerank_top_k=50)
```

or `python scripts/evaluate.py --model DUAL_ENCODER --dataset {recipe.data.name} --reranker {folder}`.

## Training

{training_summary or ""} {_loss_description(options)}

At re-ranking, a candidate's final score is `(1 - a) z(first-stage score) + a z(IMRAM score)` (z-scores
over the query's K candidates), with `a = config.fusion_weight` (1 = IMRAM's order alone; chosen on the
validation split by `scripts/choose_fusion_weight.py`, which adds its table to this card).

```yaml
{recipe.to_yaml().rstrip()}
```
"""
    return ModelCard(text)


__all__ = ["build_imram_model_card"]
