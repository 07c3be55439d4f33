"""Datasets by name, for configs and scripts: ``load_dataset_by_name("shapes", num_images=1000)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets

from hf_pcme.data.coco import load_coco
from hf_pcme.data.cub import load_cub
from hf_pcme.data.flickr30k import load_flickr30k
from hf_pcme.data.hub import load_hub
from hf_pcme.data.imagefolder import load_imagefolder
from hf_pcme.data.shapes import load_shapes
from hf_pcme.data.shapes_web import load_shapes_web
from hf_pcme.data.transforms import make_eval_transform, make_train_transform
from hf_pcme.registry import lookup

DATASETS: dict[str, Callable[..., datasets.DatasetDict | datasets.Dataset]] = {
    "coco": load_coco,
    "cub": load_cub,
    "shapes": load_shapes,
    "imagefolder": load_imagefolder,
    "hub": load_hub,
    "flickr30k": load_flickr30k,
    "shapes_web": load_shapes_web,
}

# Datasets whose captions state positions / sizes / counts: geometric augmentation would make them false.
NO_GEOMETRIC_AUGMENTATION = frozenset({"shapes", "shapes_web"})


def load_dataset_by_name(name: str, **kwargs: Any) -> datasets.DatasetDict | datasets.Dataset:
    """``DATASETS[name](**kwargs)``; an unknown name raises a ``ValueError`` listing the choices."""
    return lookup(DATASETS, name, "dataset")(**kwargs)


def train_transform_for(name: str, processor: Any, **kwargs: Any) -> Callable[[dict], dict]:
    """The training transform suited to dataset ``name`` (no crop / flip for shapes)."""
    lookup(DATASETS, name, "dataset")
    if name in NO_GEOMETRIC_AUGMENTATION:
        return make_eval_transform(processor, **{k: v for k, v in kwargs.items() if k == "image_column"})
    return make_train_transform(processor, **kwargs)
