"""CUB-200-2011 with the Reed et al. (2016) captions and the zero-shot class split, via ``datasets``.

Splits (Xian et al. zero-shot split, as in PCME): ``train`` = the classes in
``trainvalclasses.txt`` (150), ``test`` = the classes in ``testclasses.txt`` (50); the two class
sets are disjoint, so test retrieval is on unseen classes. One row per caption, images in
``images.txt`` order::

    image       datasets.Image()  path to the JPEG, decoded lazily
    image_id    int64    CUB image id (images.txt)
    caption     string   one line of text_c10/<class_dir>/<image>.txt
    caption_id  int64    image_id * 100 + line index among the non-empty lines (stable across builds)
    label       ClassLabel over the 200 classes.txt names, 0-based (= class_id - 1)
    class_id    int64    CUB class id, 1-based (classes.txt / image_class_labels.txt)
    class_name  string   readable class name ("Black footed Albatross")

Plausible match on CUB = same class. Every consistency check (ids, classes, files on disk) runs in
a first pass before any Arrow is written. Batches with one caption per class: see
:class:`hf_pcme.data.samplers.ClassBalancedBatchSampler`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from hf_pcme.data._common import (
    ArrowBatcher,
    MissingFileCounter,
    build_with_cache,
    code_hash,
    file_signature,
    require_dir,
    require_file,
)
from hf_pcme.registry import check_choice

SPLIT_FILES = {"train": "trainvalclasses.txt", "test": "testclasses.txt"}
MAX_CAPTIONS_PER_IMAGE = 100
CUB_LAYOUT = """\
  Either everything in one folder:
  <data_dir>/
    images.txt                    "<image_id> <class_dir>/<file>.jpg" per line
    image_class_labels.txt        "<image_id> <class_id>" per line
    classes.txt                   "<class_id> <class_dir>" per line, e.g. "1 001.Black_footed_Albatross"
    images/<class_dir>/<file>.jpg
    text_c10/<class_dir>/<file>.txt   captions (Reed et al. 2016), one per line
    trainvalclasses.txt           zero-shot split (Xian et al.): 150 class dirs, one per line
    testclasses.txt               50 class dirs (these two may live in class_split_dir instead)
  or the two folders as downloaded (original PCME: --dataset_root / --caption_root):
  CUB_200_2011/                   data_dir: images.txt, image_class_labels.txt, classes.txt, images/
  cvpr2016_cub/                   Reed et al. 2016
    text_c10/<class_dir>/<file>.txt   caption_dir= this folder (or cvpr2016_cub itself)
    trainvalclasses.txt, testclasses.txt   used when data_dir has none"""


def _read_pairs(path: Path, what: str) -> list[tuple[int, str]]:
    """Lines "<int> <text>" of a CUB metadata file; ValueError naming the file and line otherwise."""
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        first, _, rest = line.strip().partition(" ")
        if not first.isdigit() or not rest.strip():
            raise ValueError(f"{path}, line {number}: expected {what}, got {line!r}.")
        pairs.append((int(first), rest.strip()))
    return pairs


def _read_names(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def readable_class_name(class_dir: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross'."""
    return class_dir.split(".", 1)[-1].replace("_", " ")


def resolve_caption_dir(data_dir: str | os.PathLike, caption_dir: str | os.PathLike | None = None) -> Path:
    """The ``text_c10`` folder: ``<data_dir>/text_c10`` by default; ``caption_dir`` may name
    ``text_c10`` itself (the original code's ``--caption_root``) or the ``cvpr2016_cub`` folder
    that holds it."""
    if caption_dir is None:
        return require_dir(Path(data_dir) / "text_c10", "CUB captions folder (text_c10, Reed et al. 2016)", CUB_LAYOUT)
    caption_dir = require_dir(caption_dir, "CUB caption_dir", CUB_LAYOUT)
    return caption_dir / "text_c10" if (caption_dir / "text_c10").is_dir() else caption_dir


def _class_split_root(root: Path, class_split_dir: str | os.PathLike | None, caption_root: Path) -> Path:
    """``class_split_dir`` if given; else ``data_dir``, or the folder above ``text_c10``
    (``cvpr2016_cub/``) when ``data_dir`` has no ``trainvalclasses.txt`` but that folder does."""
    if class_split_dir is not None:
        return require_dir(class_split_dir, "CUB class split folder", CUB_LAYOUT)
    if not (root / SPLIT_FILES["train"]).is_file() and (caption_root.parent / SPLIT_FILES["train"]).is_file():
        return caption_root.parent
    return root


def cub_source_paths(
    data_dir: str | os.PathLike,
    class_split_dir: str | os.PathLike | None = None,
    caption_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, Path], Path]:
    """The metadata files by name, and the ``text_c10`` folder (see :func:`load_cub`)."""
    root = require_dir(data_dir, "CUB data_dir", CUB_LAYOUT)
    caption_root = resolve_caption_dir(root, caption_dir)
    split_root = _class_split_root(root, class_split_dir, caption_root)
    paths = {name: require_file(root / f"{name}.txt", f"CUB {name}.txt", CUB_LAYOUT)
             for name in ("images", "image_class_labels", "classes")}
    paths.update({split: require_file(split_root / name, f"CUB class split {name}", CUB_LAYOUT)
                  for split, name in SPLIT_FILES.items()})
    require_dir(root / "images", "CUB images folder", CUB_LAYOUT)
    return paths, caption_root


@dataclass
class CubConfig(datasets.BuilderConfig):
    """``data_dir``: the CUB root (see ``CUB_LAYOUT``); other fields: see :func:`load_cub`."""

    class_split_dir: str | None = None
    caption_dir: str | None = None
    missing_images: str = "error"
    source_signature: str = ""


class Cub200(datasets.ArrowBasedBuilder):
    """``datasets`` builder for CUB-200-2011 captions with the zero-shot class split."""

    BUILDER_CONFIG_CLASS = CubConfig

    def _paths(self) -> dict[str, Path]:
        return cub_source_paths(self.config.data_dir, self.config.class_split_dir, self.config.caption_dir)[0]

    def _caption_root(self) -> Path:
        return resolve_caption_dir(self.config.data_dir, self.config.caption_dir)

    def _class_dirs(self) -> list[str]:
        """Class dirs indexed by class_id - 1; classes.txt must number them 1..N."""
        path = self._paths()["classes"]
        pairs = _read_pairs(path, '"<class_id> <class_dir>"')
        if [class_id for class_id, _ in pairs] != list(range(1, len(pairs) + 1)):
            raise ValueError(f"{path} must list class ids 1..N in order.")
        return [class_dir for _, class_dir in pairs]

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description="CUB-200-2011 with Reed et al. captions, zero-shot class split (Xian et al.).",
            features=datasets.Features(
                {
                    "image": datasets.Image(),
                    "image_id": datasets.Value("int64"),
                    "caption": datasets.Value("string"),
                    "caption_id": datasets.Value("int64"),
                    "label": datasets.ClassLabel(names=self._class_dirs()),
                    "class_id": datasets.Value("int64"),
                    "class_name": datasets.Value("string"),
                }
            ),
        )

    def _split_generators(self, dl_manager: Any) -> list[datasets.SplitGenerator]:
        paths = self._paths()
        class_dirs = self._class_dirs()
        class_of_image = {}
        for image_id, class_id in _read_pairs(paths["image_class_labels"], '"<image_id> <class_id>"'):
            if not class_id.isdigit():
                raise ValueError(
                    f"{paths['image_class_labels']}: image {image_id} has class {class_id!r}; expected an integer id."
                )
            class_of_image[image_id] = int(class_id)
        images = _read_pairs(paths["images"], '"<image_id> <class_dir>/<file>.jpg"')
        split_of_class: dict[str, str] = {}
        for split in SPLIT_FILES:
            for name in _read_names(paths[split]):
                if name not in class_dirs:
                    raise ValueError(f"{paths[split]} names the class {name!r}, which is not in {paths['classes']}.")
                if name in split_of_class:
                    raise ValueError(f"The class {name!r} is in both {SPLIT_FILES['train']} and {SPLIT_FILES['test']}.")
                split_of_class[name] = split
        plan: dict[str, list[tuple[int, str, int]]] = {split: [] for split in SPLIT_FILES}
        missing_images = MissingFileCounter(self.config.missing_images, "CUB image")
        missing_captions = MissingFileCounter(
            "skip" if self.config.missing_images == "skip" else "error", "CUB caption file"
        )
        root = Path(self.config.data_dir)
        caption_root = self._caption_root()
        for image_id, relative_path in sorted(images):
            class_id = class_of_image.get(image_id)
            if class_id is None:
                raise ValueError(
                    f"Image {image_id} of {paths['images']} has no class in {paths['image_class_labels']}."
                )
            if not 1 <= class_id <= len(class_dirs):
                raise ValueError(f"Image {image_id} has class_id {class_id}, which is not in {paths['classes']}.")
            class_dir = class_dirs[class_id - 1]
            if relative_path.split("/", 1)[0] != class_dir:
                raise ValueError(
                    f"Image {image_id} is {relative_path!r} in {paths['images']} but its class is {class_dir!r}."
                )
            split = split_of_class.get(class_dir)
            if split is None:
                continue  # a class in neither split file takes no part
            if missing_images.is_missing(str(root / "images" / relative_path)):
                continue
            if missing_captions.is_missing(str(caption_root / Path(relative_path).with_suffix(".txt"))):
                continue
            plan[split].append((image_id, relative_path, class_id))
        missing_images.report(str(root))
        missing_captions.report(str(caption_root))
        return [
            datasets.SplitGenerator(name=split, gen_kwargs={"images": plan[split], "class_dirs": class_dirs})
            for split in SPLIT_FILES
        ]

    def _generate_tables(self, images: list[tuple[int, str, int]], class_dirs: list[str]) -> Iterator[tuple[str, Any]]:
        root = Path(self.config.data_dir)
        caption_root = self._caption_root()
        batcher = ArrowBatcher(self.info.features)
        for image_id, relative_path, class_id in images:
            text_path = caption_root / Path(relative_path).with_suffix(".txt")
            try:
                captions = [line.strip() for line in text_path.read_text(encoding="utf-8").splitlines() if line.strip()]
            except UnicodeDecodeError as exc:
                raise ValueError(f"{text_path} is not UTF-8 text ({exc}).") from None
            if not captions or len(captions) > MAX_CAPTIONS_PER_IMAGE:
                raise ValueError(f"{text_path} has {len(captions)} captions; expected 1..{MAX_CAPTIONS_PER_IMAGE}.")
            for line, caption in enumerate(captions):
                table = batcher.add(
                    {
                        "image": str(root / "images" / relative_path),
                        "image_id": image_id,
                        "caption": caption,
                        "caption_id": image_id * MAX_CAPTIONS_PER_IMAGE + line,
                        "label": class_id - 1,
                        "class_id": class_id,
                        "class_name": readable_class_name(class_dirs[class_id - 1]),
                    }
                )
                if table is not None:
                    yield f"{image_id}-{line}", table
        table = batcher.flush()
        if table is not None:
            yield "end", table


def load_cub(
    data_dir: str | os.PathLike,
    *,
    class_split_dir: str | os.PathLike | None = None,
    caption_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    missing_images: str = "error",
    split: str | None = None,
) -> datasets.DatasetDict | datasets.Dataset:
    """Build (first call) or memory-map (later calls) CUB-200-2011 captions with the zero-shot split.

    Args:
        data_dir: CUB root (see ``CUB_LAYOUT``).
        class_split_dir: folder with ``trainvalclasses.txt`` / ``testclasses.txt`` (default
            ``data_dir``, or the folder above ``text_c10`` when ``data_dir`` has none: Reed et
            al.'s ``cvpr2016_cub/`` ships them).
        caption_dir: the captions downloaded separately (the original code's ``--caption_root``):
            ``cvpr2016_cub/text_c10`` or ``cvpr2016_cub``. Default ``<data_dir>/text_c10``.
        cache_dir: where the Arrow cache lives (default: the ``datasets`` cache).
        missing_images: ``"error"`` (raise naming the file), ``"skip"`` (drop the image, with a
            counted warning; also applies to missing caption files) or ``"unchecked"``.
        split: return only this split (``"train"`` or ``"test"``).
    """
    check_choice(missing_images, ("error", "skip", "unchecked"), "missing_images")
    if split is not None:
        check_choice(split, SPLIT_FILES, "split")
    paths, _ = cub_source_paths(data_dir, class_split_dir, caption_dir)
    builder = Cub200(
        cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        hash=code_hash(__file__),
        data_dir=os.path.abspath(data_dir),
        class_split_dir=None if class_split_dir is None else os.path.abspath(class_split_dir),
        caption_dir=None if caption_dir is None else os.path.abspath(caption_dir),
        missing_images=missing_images,
        source_signature=file_signature(paths.values()),
    )
    splits = build_with_cache(builder)
    return splits if split is None else splits[split]
