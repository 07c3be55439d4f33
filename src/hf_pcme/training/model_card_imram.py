"""The model card of an IMRAM re-ranker trained with ``model.architecture: imram``."""

from __future__ import annotations

from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .config import Recipe


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

{training_summary or ""} Hardest-negative triplet loss (margin {options.get("margin", 0.2)}) over every
image-caption pair of the batch.

```yaml
{recipe.to_yaml().rstrip()}
```
"""
    return ModelCard(text)


__all__ = ["build_imram_model_card"]
