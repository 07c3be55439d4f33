"""MS-COCO 2014 captions in the Karpathy split, built from the official files with ``datasets``.

Splits (docs/formulas.md, "Evaluation protocols"): ``train`` = Karpathy train + restval (113,287 images, ~566k captions),
``val`` (5,000 images) and ``test`` (5,000 images / 25,000 captions). One row per caption::

    image                datasets.Image()  path to the JPEG, decoded lazily (may be grayscale: see transforms)
    image_id             int64   COCO image id (Karpathy "cocoid")
    caption              string  the Karpathy "raw" sentence, whitespace collapsed
    caption_id           int64   COCO caption annotation id
    labels_multi_hot     int8[80] instance categories present in the image (all zero: no instance annotation)
    karpathy_split       string  train | restval | val | test
    karpathy_sentence_id int64   Karpathy "sentid" (not a COCO id)

``labels_multi_hot`` has 80 entries, one per COCO category in increasing category-id order (the
ids run 1..90 with gaps). The original PCME code used a 90-d vector indexed by ``category_id - 1``
with 10 entries always zero; PMRP only uses Hamming distances between these vectors, which the
dropped always-zero entries do not change.

Karpathy sentence ids are not COCO annotation ids, so each sentence is matched to an annotation of
the same image by its text with whitespace collapsed; if that fails, ignoring case and punctuation.
Duplicate captions of one image are matched to distinct annotations.

The build streams all JSON files item by item (``_json_stream``; the COCO annotation files are read
by :mod:`hf_pcme.data._coco_annotations`) and writes Arrow in batches, so
memory holds a few compact numpy index arrays rather than the decoded JSON. Every check (unknown
images, unmatched sentences, images missing on disk) runs in a first pass, before any Arrow is
written. The result is cached under ``cache_dir``; a second ``load_coco`` memory-maps it.
Retrieval evaluation views: :func:`hf_pcme.data.views.make_retrieval_split`.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from hf_pcme.data._common import (
    ArrowBatcher,
    MissingFileCounter,
    build_with_cache,
    code_hash,
    file_signature,
    logger,
    require_dir,
    require_file,
)
from hf_pcme.data import _coco_annotations
from hf_pcme.data._coco_annotations import (
    NUM_COCO_CATEGORIES,
    CaptionIndex,
    CategoryLabels,
    int_field,
    str_field,
)
from hf_pcme.data._json_stream import MalformedJSONError, iter_json_object
from hf_pcme.registry import check_choice

SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
UNMATCHED_CAPTION_POLICIES = ("error", "skip")
COCO_LAYOUT = """\
  <data_dir>/
    annotations/captions_train2014.json    official COCO 2014 captions
    annotations/captions_val2014.json
    annotations/instances_train2014.json   official COCO 2014 instances (for the 80-d category labels)
    annotations/instances_val2014.json
    train2014/COCO_train2014_<12-digit id>.jpg
    val2014/COCO_val2014_<12-digit id>.jpg
    dataset_coco.json                      Karpathy split (or pass karpathy_json=...)"""



def coco_features() -> datasets.Features:
    return datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "caption": datasets.Value("string"),
            "caption_id": datasets.Value("int64"),
            "labels_multi_hot": datasets.List(datasets.Value("int8"), length=NUM_COCO_CATEGORIES),
            "karpathy_split": datasets.Value("string"),
            "karpathy_sentence_id": datasets.Value("int64"),
        }
    )


@dataclass
class CocoKarpathyConfig(datasets.BuilderConfig):
    """``data_dir``: the COCO root (see ``COCO_LAYOUT``); other fields: see :func:`load_coco`."""

    karpathy_json: str | None = None
    missing_images: str = "error"
    unmatched_captions: str = "error"
    source_signature: str = ""


class CocoKarpathy(datasets.ArrowBasedBuilder):
    """``datasets`` builder for COCO 2014 captions in the Karpathy split (see the module docstring)."""

    BUILDER_CONFIG_CLASS = CocoKarpathyConfig

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description="MS-COCO 2014 captions, Karpathy split (train = train + restval).",
            features=coco_features(),
        )

    def _paths(self) -> dict[str, Path]:
        return coco_source_paths(self.config.data_dir, self.config.karpathy_json)

    def _split_generators(self, dl_manager: Any) -> list[datasets.SplitGenerator]:
        paths = self._paths()
        captions, labels = CaptionIndex(), CategoryLabels()
        for part in ("train", "val"):
            captions.read(paths[f"captions_{part}"])
            labels.read(paths[f"instances_{part}"])
        captions.finalize()
        labels.finalize()
        plan = self._plan(paths["karpathy"], captions, labels)
        return [
            datasets.SplitGenerator(name=name, gen_kwargs={"split": name, "plan": plan, "labels": labels})
            for name in SPLITS
        ]

    def _iter_karpathy_images(self, path: Path) -> Iterator[Any]:
        seen = False
        for key, item, is_item in iter_json_object(path, ("images",)):
            if key != "images":
                continue
            seen = True
            if is_item:
                yield item
        if not seen:
            raise MalformedJSONError(f"{path} has no 'images' array; expected the Karpathy dataset_coco.json format.")

    def _image_record(self, item: Any, index: int, path: Path) -> tuple[int, str, str, list[dict[str, Any]]]:
        cocoid = int_field(item, "cocoid", path, "images", index)
        split = str_field(item, "split", path, "images", index)
        if split not in ("train", "restval", "val", "test"):
            raise MalformedJSONError(
                f"Image cocoid={cocoid} in {path} has split {split!r}; expected train|restval|val|test."
            )
        filename = str_field(item, "filename", path, "images", index)
        # Karpathy's "filepath" is train2014 / val2014; infer it from COCO_<folder>_<id>.jpg if absent.
        folder = item.get("filepath") or (filename.split("_")[1] if filename.count("_") >= 2 else "")
        sentences = item.get("sentences")
        if not isinstance(sentences, list) or not all(
            isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences
        ):
            raise MalformedJSONError(
                f"Image cocoid={cocoid} in {path} needs a 'sentences' list of {{'raw', 'sentid'}}."
            )
        image_path = os.path.join(self.config.data_dir, folder, filename)
        return cocoid, split, image_path, sentences

    def _plan(self, path: Path, captions: CaptionIndex, labels: CategoryLabels) -> dict[str, np.ndarray]:
        """First pass over the Karpathy file: check everything, match sentences, decide what to keep."""
        missing = MissingFileCounter(self.config.missing_images, "COCO image")
        keep_image = array("b")
        sentence_annotation = array("q")
        seen_images: set[int] = set()
        unmatched, first_unmatched = 0, None
        for index, item in enumerate(self._iter_karpathy_images(path)):
            cocoid, split, image_path, sentences = self._image_record(item, index, path)
            if cocoid in seen_images:
                raise ValueError(f"Image cocoid={cocoid} appears twice in {path}.")
            seen_images.add(cocoid)
            if not captions.is_known(cocoid):
                raise ValueError(f"Image cocoid={cocoid} ({image_path}) of {path} is not in captions_*2014.json.")
            if labels.row(cocoid) < 0:
                raise ValueError(f"Image cocoid={cocoid} ({image_path}) of {path} is not in instances_*2014.json.")
            matches = captions.match(cocoid, [s["raw"] for s in sentences])
            for sentence, annotation_id in zip(sentences, matches):
                if annotation_id >= 0:
                    continue
                if self.config.unmatched_captions == "error":
                    raise ValueError(
                        f"Karpathy sentence sentid={sentence.get('sentid')} of image cocoid={cocoid} "
                        f"({sentence['raw']!r}) matches no caption of that image in captions_*2014.json "
                        "(compared with whitespace collapsed, then ignoring case and punctuation). Pass "
                        "unmatched_captions='skip' to drop such sentences with a counted warning."
                    )
                unmatched += 1
                first_unmatched = first_unmatched or (cocoid, sentence["raw"])
            sentence_annotation.extend(matches)
            keep_image.append(0 if missing.is_missing(image_path) else 1)
        missing.report(str(path))
        if unmatched:
            logger.warning(
                "Dropped %d Karpathy sentence(s) that match no COCO caption (first: image %d, %r).",
                unmatched, *first_unmatched,
            )
        return {
            "keep_image": np.frombuffer(keep_image, np.int8).astype(bool),
            "sentence_annotation": np.frombuffer(sentence_annotation, np.int64),
        }

    def _generate_tables(self, split: str, plan: dict[str, np.ndarray], labels: CategoryLabels):
        path = self._paths()["karpathy"]
        batcher = ArrowBatcher(self.info.features)
        sentence_offset = 0
        for index, item in enumerate(self._iter_karpathy_images(path)):
            cocoid, karpathy_split, image_path, sentences = self._image_record(item, index, path)
            annotation_ids = plan["sentence_annotation"][sentence_offset : sentence_offset + len(sentences)]
            sentence_offset += len(sentences)
            if karpathy_split not in SPLITS[split] or not plan["keep_image"][index]:
                continue
            multi_hot = labels.multi_hot[labels.row(cocoid)]
            for sentence, annotation_id in zip(sentences, annotation_ids.tolist()):
                if annotation_id < 0:
                    continue
                table = batcher.add(
                    {
                        "image": image_path,
                        "image_id": cocoid,
                        "caption": " ".join(sentence["raw"].split()),
                        "caption_id": annotation_id,
                        "labels_multi_hot": multi_hot,
                        "karpathy_split": karpathy_split,
                        "karpathy_sentence_id": int(sentence.get("sentid", -1)),
                    }
                )
                if table is not None:
                    yield f"{split}-{index}", table
        table = batcher.flush()
        if table is not None:
            yield f"{split}-end", table


def coco_source_paths(data_dir: str | os.PathLike, karpathy_json: str | os.PathLike | None = None) -> dict[str, Path]:
    """The five annotation files of a COCO root, checked to exist (``FileNotFoundError`` shows the layout)."""
    root = require_dir(data_dir, "COCO data_dir", COCO_LAYOUT)
    annotations = require_dir(root / "annotations", "COCO annotations folder", COCO_LAYOUT)
    paths = {
        f"{kind}_{part}": require_file(annotations / f"{kind}_{part}2014.json", f"COCO {kind} file", COCO_LAYOUT)
        for kind in ("captions", "instances")
        for part in ("train", "val")
    }
    if karpathy_json is None:
        candidates = [root / "dataset_coco.json", annotations / "dataset_coco.json"]
        karpathy_json = next((c for c in candidates if c.is_file()), candidates[0])
    paths["karpathy"] = require_file(karpathy_json, "Karpathy split file (dataset_coco.json)", COCO_LAYOUT)
    return paths


def load_coco(
    data_dir: str | os.PathLike,
    *,
    karpathy_json: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    missing_images: str = "error",
    unmatched_captions: str = "error",
    split: str | None = None,
) -> datasets.DatasetDict | datasets.Dataset:
    """Build (first call) or memory-map (later calls) COCO 2014 captions in the Karpathy split.

    Args:
        data_dir: COCO root with ``annotations/``, ``train2014/``, ``val2014/`` (see ``COCO_LAYOUT``).
        karpathy_json: ``dataset_coco.json``; default ``data_dir/dataset_coco.json``.
        cache_dir: where the Arrow cache lives (default: the ``datasets`` cache).
        missing_images: ``"error"`` (raise naming the file), ``"skip"`` (drop the image and its
            captions, with one counted warning) or ``"unchecked"`` (do not look at the disk).
        unmatched_captions: ``"error"`` or ``"skip"`` for Karpathy sentences that match no COCO caption.
        split: return only this split (``"train"``, ``"val"`` or ``"test"``).

    Returns:
        A ``DatasetDict`` (or one ``Dataset``) with one row per caption (see the module docstring).
    """
    check_choice(missing_images, ("error", "skip", "unchecked"), "missing_images")
    check_choice(unmatched_captions, UNMATCHED_CAPTION_POLICIES, "unmatched_captions")
    if split is not None:
        check_choice(split, SPLITS, "split")
    paths = coco_source_paths(data_dir, karpathy_json)
    builder = CocoKarpathy(
        cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        hash=code_hash(__file__, _coco_annotations.__file__, _json_stream_file()),
        data_dir=os.path.abspath(data_dir),
        karpathy_json=os.path.abspath(paths["karpathy"]),
        missing_images=missing_images,
        unmatched_captions=unmatched_captions,
        source_signature=file_signature(paths.values()),
    )
    splits = build_with_cache(builder)
    return splits if split is None else splits[split]


def _json_stream_file() -> str:
    from hf_pcme.data import _json_stream

    return _json_stream.__file__
