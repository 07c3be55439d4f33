"""ECCV Caption and CxC: COCO 5K retrieval with extra human-verified positives.

ECCV Caption (Chun et al., "ECCV Caption: Correcting False Negatives by Collecting
Machine-and-Human-verified Image-Caption Associations for MS-COCO", ECCV 2022) adds verified
positives to 1,332 caption queries and 1,261 image queries of the COCO 5K test split and reports,
per direction, against those positives (``R`` = number of positives of the query):

- mAP@R = (1/R) sum_{r=1..R} P(r) rel(r), with P(r) = |top-r ∩ positives| / r;
- R-Precision (R-P) = |top-R ∩ positives| / R;
- R@1 = 1 if the first item is a positive.

CxC (Parekh et al., "Crisscrossed Captions", EACL 2021) adds similarity-rated positives to the
same split; it is reported as R@K.

The positives are the JSON files shipped by the ``eccv_caption`` package (``pip install
hf_pcme[eccv]``, MIT licence; or pass ``annotation_dir``, a folder holding the same files). Only the
files are read; the numbers come from our chunked ranking
(:func:`hf_pcme.metrics.evaluate_retrieval`), so the 25K x 5K score matrix is never held or sorted.

Keys (percent; the package's own names in brackets): ``eccv_i2t_map@r`` (``eccv_map_at_r``),
``eccv_i2t_rp`` (``eccv_rprecision``), ``eccv_i2t_r@1`` (``eccv_r1``), the same for ``t2i``, and
``cxc_i2t_r@1`` / ``r@5`` / ``r@10`` (``cxc_r1`` ...), plus the keys of the plain COCO protocol
(5K, and ``1k/`` when the images form whole folds). Images are identified by their COCO image id,
captions by their COCO caption annotation id (``image_ids`` / ``text_ids``).

Like ``eccv_caption``: a few verified captions are not among the 25,000 test captions (COCO images
with 6-7 captions keep 5 in the Karpathy split); they count in ``R`` and are never retrieved.
Queries absent from ``image_ids`` / ``text_ids`` are left out with a warning (the result is then
not comparable with published numbers). Ties: see :mod:`hf_pcme.metrics.retrieval`
(pessimistic); ``eccv_caption`` takes the given order, so scores with ties can differ.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Positive sets by name: the files ``<name>_image_to_caption.json`` / ``<name>_caption_to_image.json``.
POSITIVE_SETS = ("eccv", "cxc", "original")
ECCV_KEYS = {"map@r": "map_at_r", "rp": "r_precision", "r@1": "positives_R@1"}


def find_annotation_dir(path: str | Path | None = None) -> Path:
    """The folder of ECCV Caption / CxC positives: ``path``, or the ``eccv_caption`` package's ``data/``.

    Found without importing the package (its import warns when ``ujson`` is missing); works offline.
    """
    if path is not None:
        folder = Path(path)
    else:
        spec = importlib.util.find_spec("eccv_caption")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "protocol='eccv_caption' / 'cxc' reads the positives shipped by the `eccv_caption` package: "
                "`pip install hf_pcme[eccv]` (or `pip install eccv_caption`), or pass annotation_dir=<folder with "
                "eccv_image_to_caption.json etc.>."
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not folder.is_dir():
        raise FileNotFoundError(f"ECCV Caption annotation folder not found: {folder}.")
    return folder


@functools.lru_cache(maxsize=8)
def _load_cached(folder: str, name: str) -> dict[str, dict[int, tuple[int, ...]]]:
    result = {}
    for direction, stem in (("i2t", "image_to_caption"), ("t2i", "caption_to_image")):
        path = Path(folder) / f"{name}_{stem}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; expected the {name!r} positives of eccv_caption there.")
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
        result[direction] = {int(query): tuple(int(item) for item in items) for query, items in raw.items()}
    return result


def load_positives(name: str = "eccv", annotation_dir: str | Path | None = None) -> dict[str, dict[int, tuple[int, ...]]]:
    """``{"i2t": {image_id: caption_ids}, "t2i": {caption_id: image_ids}}`` of one positive set.

    ``name``: ``"eccv"`` (ECCV Caption), ``"cxc"`` (CxC) or ``"original"`` (the COCO pairs).
    """
    if name not in POSITIVE_SETS:
        raise ValueError(f"name must be one of {POSITIVE_SETS}, got {name!r}.")
    return _load_cached(str(find_annotation_dir(annotation_dir).resolve()), name)


def positive_lists(
    positives: Mapping[str, Mapping[int, Sequence[int]]], image_ids: Sequence[int], text_ids: Sequence[int]
) -> tuple[dict[str, list[list[int]]], dict[str, np.ndarray], dict[str, int]]:
    """Id-keyed positives -> per-query index lists, unranked counts and numbers of queries left out.

    Returns ``(lists, unranked, missing_queries)``: ``lists[d][q]`` the item indices of query ``q``
    (empty: not a query of the set), ``unranked[d][q]`` its positives that are not among the items,
    ``missing_queries[d]`` how many queries of the set are not among the given ids.
    """
    image_index = {int(key): i for i, key in enumerate(image_ids)}
    text_index = {int(key): i for i, key in enumerate(text_ids)}
    if len(image_index) != len(image_ids) or len(text_index) != len(text_ids):
        raise ValueError("image_ids and text_ids must not repeat an id.")
    lists, unranked, missing = {}, {}, {}
    for direction, query_index, item_index in (("i2t", image_index, text_index), ("t2i", text_index, image_index)):
        per_query: list[list[int]] = [[] for _ in range(len(query_index))]
        extra = np.zeros(len(query_index), dtype=np.int64)
        missing[direction] = 0
        for query, items in positives[direction].items():
            row = query_index.get(query)
            if row is None:
                missing[direction] += 1
                continue
            unique = set(items)
            per_query[row] = sorted(item_index[item] for item in unique if item in item_index)
            extra[row] = len(unique) - len(per_query[row])
        lists[direction], unranked[direction] = per_query, extra
    return lists, unranked, missing


def evaluate_eccv_caption(
    *,
    protocol: str = "eccv_caption",
    image_ids: Sequence[int] | None,
    text_ids: Sequence[int] | None,
    annotation_dir: str | Path | None = None,
    ks: Sequence[int] = (1, 5, 10),
    fold_size: int = 1000,
    **kwargs: Any,
) -> dict[str, float]:
    """COCO keys + ECCV Caption (``protocol="eccv_caption"``, also CxC R@K) or CxC (``"cxc"``) keys.

    Takes the arguments of :func:`hf_pcme.metrics.evaluate_retrieval` (scores or embeddings,
    ``text_to_image``, ...) plus ``image_ids`` (COCO image ids, one per row) and ``text_ids``
    (COCO caption annotation ids, one per column), which are required. Three ranking passes:
    the COCO pairs (with ``1k/`` keys when ``num_images`` is a multiple of ``fold_size``), the
    ECCV positives, the CxC positives.
    """
    from .retrieval import evaluate_retrieval

    if protocol not in ("eccv_caption", "cxc"):
        raise ValueError(f"protocol must be 'eccv_caption' or 'cxc', got {protocol!r}.")
    if image_ids is None or text_ids is None:
        raise ValueError(
            f"protocol={protocol!r} needs image_ids (COCO image ids, one per image row) and text_ids (COCO caption "
            "annotation ids, one per caption column) to find the positives."
        )
    image_ids = [int(i) for i in np.asarray(image_ids).reshape(-1)]
    text_ids = [int(i) for i in np.asarray(text_ids).reshape(-1)]
    num_images = len(image_ids)
    results = evaluate_retrieval(
        protocol="coco" if num_images % fold_size == 0 else None, ks=ks, fold_size=fold_size, **kwargs
    )
    # the positive passes need no PMRP
    kwargs = {key: value for key, value in kwargs.items() if key not in ("image_labels", "plausibility")}
    kwargs["image_classes"] = None
    sets = [("eccv", "eccv", (1,)), ("cxc", "cxc", tuple(ks))] if protocol == "eccv_caption" else [("cxc", "cxc", tuple(ks))]
    for name, prefix, set_ks in sets:
        results.update(_positive_set_metrics(name, prefix, set_ks, image_ids, text_ids, annotation_dir, kwargs))
    return results


def _positive_set_metrics(
    name: str,
    prefix: str,
    ks: tuple[int, ...],
    image_ids: list[int],
    text_ids: list[int],
    annotation_dir: str | Path | None,
    evaluate_kwargs: dict[str, Any],
) -> dict[str, float]:
    """One ranking pass against the ``name`` positives (``"eccv"`` or ``"cxc"``), as ``{prefix}_{direction}_...`` keys."""
    from .retrieval import evaluate_retrieval

    lists, unranked, missing = positive_lists(load_positives(name, annotation_dir), image_ids, text_ids)
    for direction, count in missing.items():
        if count:
            total = len(load_positives(name, annotation_dir)[direction])
            logger.warning(
                "%s: %d of the %d %s queries are not among the given ids and are left out; the numbers are not "
                "comparable with published ones (those use the whole COCO 5K test split).",
                name, count, total, direction,
            )  # fmt: skip
    if not any(lists["i2t"]) and not any(lists["t2i"]):
        raise ValueError(
            f"None of the given ids is a query of the {name!r} positives: image_ids must be COCO image ids and "
            "text_ids COCO caption annotation ids of the 5K test split."
        )
    part = evaluate_retrieval(
        positives=lists, unranked_positives=unranked, image_ids=None, text_ids=None, ks=ks, **evaluate_kwargs
    )
    results = {}
    for direction in ("i2t", "t2i"):
        if name == "eccv":
            for key, source in ECCV_KEYS.items():
                results[f"{prefix}_{direction}_{key}"] = part[f"{direction}_{source}"]
        else:
            for k in ks:
                results[f"{prefix}_{direction}_r@{k}"] = part[f"{direction}_positives_R@{k}"]
    return results


def pcmepp_table(metrics: Mapping[str, float]) -> str:
    """The PCME++ (Chun, ICLR 2024) main-table columns as text: ECCV Caption mAP@R / R-P / R@1,
    CxC R@1, COCO 1K R@1, 5K R@1, RSUM; one row per direction and their mean (as PCME++ reports)."""
    columns = [("ECCV mAP@R", "eccv_{d}_map@r"), ("ECCV R-P", "eccv_{d}_rp"), ("ECCV R@1", "eccv_{d}_r@1"),
               ("CxC R@1", "cxc_{d}_r@1"), ("1K R@1", "1k/{d}_R@1"), ("5K R@1", "{d}_R@1")]  # fmt: skip
    columns = [(title, key) for title, key in columns if key.format(d="i2t") in metrics]
    header = "|       | " + " | ".join(title for title, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for label, directions in (("i2t", ("i2t",)), ("t2i", ("t2i",)), ("mean", ("i2t", "t2i"))):
        values = [sum(metrics[key.format(d=d)] for d in directions) / len(directions) for _, key in columns]
        lines.append(f"| {label:<5} | " + " | ".join(f"{value:.2f}" for value in values) + " |")
    rsum = [f"RSUM {metrics[k]:.2f}" + (" (1K)" if k.startswith("1k/") else " (5K)") for k in ("1k/rsum", "rsum") if k in metrics]
    return "\n".join(lines + ([", ".join(rsum)] if rsum else []))


__all__ = ["POSITIVE_SETS", "find_annotation_dir", "evaluate_eccv_caption", "load_positives", "pcmepp_table", "positive_lists"]
