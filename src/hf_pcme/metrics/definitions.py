"""The plain definitions of the retrieval metrics, one query at a time (the reference of the fast paths).

These functions are slow (a full sort per query) and written to be read: the histogram
selection of :mod:`hf_pcme.metrics.ranking` (compiled kernel and torch ops) and
:func:`hf_pcme.metrics.evaluate_retrieval` are tested against them (tests/test_metric_definitions.py).
Each takes one query's score row (higher = better) and a bool mask of the relevant items and
returns ``None`` when the query has no relevant item (such queries are not scored).

Ranks (the tie rule of every metric here): items sorted by score, descending; among *equal*
scores the irrelevant items come first ("pessimistic"). A relevant item's rank is
``1 + #{irrelevant items scoring >= it} + #{relevant items scoring > it}``: deterministic,
independent of the item order, and a constant scorer gets no credit.

- Recall@K = 1 if a relevant item is among the top K.
- R-Precision = |top-R ∩ relevant| / R, ``R`` = number of relevant items.
- MAP@R = (1/R) sum_{i=1..R} P(i) rel(i), ``P(i)`` = precision of the top i (Musgrave et al.,
  "A Metric Learning Reality Check", ECCV 2020).
- PMRP_zeta = R-Precision with relevant = *plausible* (multi-hot labels of the two images differ in
  at most zeta positions), ranking only the items whose image has labels (Chun et al.,
  "Probabilistic Embeddings for Cross-Modal Retrieval", CVPR 2021).
"""

from __future__ import annotations

import numpy as np


def ranked_relevance(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """The relevance flags in rank order: score descending, ties -> irrelevant items first."""
    scores, relevant = np.asarray(scores, np.float64), np.asarray(relevant, bool)
    order = np.lexsort((relevant, -scores))  # the last key sorts first
    return relevant[order]


def recall_at_k(scores: np.ndarray, relevant: np.ndarray, k: int) -> float | None:
    """1.0 if a relevant item is among the top ``k``, else 0.0 (``None``: no relevant item)."""
    flags = ranked_relevance(scores, relevant)
    if not flags.any():
        return None
    return float(flags[:k].any())


def r_precision(scores: np.ndarray, relevant: np.ndarray) -> float | None:
    """|top-R ∩ relevant| / R (``None``: no relevant item)."""
    flags = ranked_relevance(scores, relevant)
    num_relevant = int(flags.sum())
    if num_relevant == 0:
        return None
    return float(flags[:num_relevant].sum()) / num_relevant


def map_at_r(scores: np.ndarray, relevant: np.ndarray) -> float | None:
    """(1/R) sum_{i=1..R} P(i) rel(i) (``None``: no relevant item)."""
    flags = ranked_relevance(scores, relevant)
    num_relevant = int(flags.sum())
    if num_relevant == 0:
        return None
    top = flags[:num_relevant]
    precision_at = np.cumsum(top) / np.arange(1, num_relevant + 1)
    return float((precision_at * top).sum()) / num_relevant


def plausible_by_labels(query_labels: np.ndarray, item_labels: np.ndarray, zeta: int) -> np.ndarray:
    """Items whose multi-hot labels differ from the query's in at most ``zeta`` positions."""
    hamming = (np.asarray(item_labels) != np.asarray(query_labels)[None, :]).sum(1)
    return hamming <= zeta


def pmrp(scores: np.ndarray, plausible: np.ndarray, considered: np.ndarray | None = None) -> float | None:
    """R-Precision against the plausible items, among the ``considered`` (labelled) items only."""
    scores, plausible = np.asarray(scores), np.asarray(plausible, bool)
    if considered is not None:
        considered = np.asarray(considered, bool)
        scores, plausible = scores[considered], plausible[considered]
    return r_precision(scores, plausible)


def reference_metrics(
    scores: np.ndarray,
    text_to_image: np.ndarray,
    image_labels: np.ndarray | None = None,
    zetas: tuple[int, ...] = (0, 1, 2),
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float]:
    """The keys of :func:`hf_pcme.metrics.evaluate_retrieval` (whole set, pairs as positives), by loops.

    ``scores`` ``(num_images, num_texts)``; a query without a relevant item (PMRP: an unlabelled
    query, or one without a plausible item) is left out of the mean; values in percent.
    """
    scores, text_to_image = np.asarray(scores), np.asarray(text_to_image)
    num_images, num_texts = scores.shape
    pairs = np.zeros((num_images, num_texts), bool)
    pairs[text_to_image, np.arange(num_texts)] = True
    results: dict[str, float] = {}
    for direction, matrix, relevant in (("i2t", scores, pairs), ("t2i", scores.T, pairs.T)):
        for k in ks:
            results[f"{direction}_R@{k}"] = _mean(recall_at_k(row, rel, k) for row, rel in zip(matrix, relevant))
        results[f"{direction}_r_precision"] = _mean(r_precision(row, rel) for row, rel in zip(matrix, relevant))
        results[f"{direction}_map_at_r"] = _mean(map_at_r(row, rel) for row, rel in zip(matrix, relevant))
    results["rsum"] = sum(results[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks)
    if image_labels is not None:
        results.update(_reference_pmrp(scores, text_to_image, np.asarray(image_labels), zetas))
    return results


def _reference_pmrp(scores, text_to_image, image_labels, zetas) -> dict[str, float]:
    labelled = image_labels.sum(1) > 0
    results = {}
    for direction in ("i2t", "t2i"):
        for zeta in zetas:
            values = []
            for query in range(scores.shape[0] if direction == "i2t" else scores.shape[1]):
                query_image = query if direction == "i2t" else text_to_image[query]
                if not labelled[query_image]:
                    continue
                item_images = text_to_image if direction == "i2t" else np.arange(scores.shape[0])
                row = scores[query] if direction == "i2t" else scores[:, query]
                plausible = plausible_by_labels(image_labels[query_image], image_labels[item_images], zeta)
                values.append(pmrp(row, plausible, considered=labelled[item_images]))
            results[f"{direction}_pmrp_zeta{zeta}"] = _mean(values)
        results[f"{direction}_pmrp"] = sum(results[f"{direction}_pmrp_zeta{z}"] for z in zetas) / len(zetas)
    return results


def _mean(values) -> float:
    """Mean in percent of the scored queries (``None`` = not scored)."""
    scored = [value for value in values if value is not None]
    return 100.0 * sum(scored) / len(scored) if scored else float("nan")
