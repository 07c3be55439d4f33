"""Validation during training (:func:`evaluate_model`, which reads the recipe's ``eval`` section).

Evaluation of a saved model lives in :mod:`hf_pcme.evaluation` (no training imports); its names are
re-exported here so existing imports keep working.
"""

from __future__ import annotations

from typing import Any

from ..evaluation import (  # noqa: F401  (re-exported)
    _concat,
    _detach,
    _shard,
    coco_protocol,
    default_scorer,
    encode_for_scorer,
    encode_split,
    retrieval_metrics,
)
from .config import Recipe


def evaluate_model(model: Any, processor: Any, dataset: Any, recipe: Recipe, accelerator: Any) -> dict[str, float]:
    """R@K, R-Precision, MAP@R, PMRP (percent, flat keys such as ``i2t_R@1``, ``t2i_pmrp``, ``rsum``).

    Ranking uses ``eval.ranking`` or the model's own score (:func:`default_scorer`); samples of the
    sampled score are seeded by the model's ``config.inference_seed``, as in ``scripts/evaluate.py``.
    With 5,000 COCO images the ``1k/`` keys of the 5-fold protocol are added.
    """
    from ..data import make_retrieval_split

    view = make_retrieval_split(dataset)
    scorer = recipe.eval.ranking or default_scorer(model)
    images, texts = encode_for_scorer(model, processor, view, accelerator, scorer=scorer,
                                      batch_size=recipe.eval.batch_size)
    return retrieval_metrics(model, view, images, texts, scorer=scorer, protocol=coco_protocol(recipe.data.name, view),
                             num_samples=recipe.eval.num_samples)


__all__ = ["coco_protocol", "default_scorer", "encode_for_scorer", "encode_split", "evaluate_model", "retrieval_metrics"]
