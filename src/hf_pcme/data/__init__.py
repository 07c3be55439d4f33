"""Data loading through ``datasets``: COCO (Karpathy split), CUB-200-2011, the generated shapes
dataset (and its noisy-tag web mode), your own data (an image folder, any ``datasets`` dataset,
Flickr30K), on-the-fly transforms, a retrieval collator and a class-balanced batch sampler.

Every loader returns a ``DatasetDict`` with one row per caption (training view);
:func:`make_retrieval_split` gives the evaluation view (unique images, captions, links and
plausibility labels)::

    from hf_pcme.data import load_shapes, make_eval_transform, make_retrieval_split, RetrievalCollator
    splits = load_shapes(4000, seed=0, cache_dir="cache")          # or load_coco(root) / load_cub(root)
    train = splits["train"].with_transform(make_eval_transform(processor))   # shapes: no crop / flip
    loader = DataLoader(train, batch_size=64, shuffle=True, collate_fn=RetrievalCollator(processor))
    view = make_retrieval_split(splits["test"])    # view.images, view.captions, view.text_to_image,
    view.plausibility.matrix()                     # (num_images, num_captions) exact plausible matches
"""

from hf_pcme.data.collate import RetrievalCollator
from hf_pcme.data.coco import load_coco
from hf_pcme.data.cub import load_cub
from hf_pcme.data.flickr30k import load_flickr30k
from hf_pcme.data.hub import load_hub
from hf_pcme.data.imagefolder import load_imagefolder
from hf_pcme.data.registry import DATASETS, load_dataset_by_name, train_transform_for
from hf_pcme.data.samplers import ClassBalancedBatchSampler
from hf_pcme.data.shapes import (
    CaptionSpec,
    Phrase,
    Shape,
    ShapesPlausibility,
    caption_text,
    is_plausible,
    load_shapes,
    parse_caption,
    plausibility_matrix,
)
from hf_pcme.data.shapes_web import load_shapes_web
from hf_pcme.data.transforms import make_eval_transform, make_train_transform, to_rgb
from hf_pcme.data.views import RetrievalSplit, make_retrieval_split

__all__ = [
    "DATASETS",
    "CaptionSpec",
    "ClassBalancedBatchSampler",
    "Phrase",
    "RetrievalCollator",
    "RetrievalSplit",
    "Shape",
    "ShapesPlausibility",
    "caption_text",
    "is_plausible",
    "load_coco",
    "load_cub",
    "load_dataset_by_name",
    "load_flickr30k",
    "load_hub",
    "load_imagefolder",
    "load_shapes",
    "load_shapes_web",
    "make_eval_transform",
    "make_retrieval_split",
    "make_train_transform",
    "parse_caption",
    "plausibility_matrix",
    "to_rgb",
    "train_transform_for",
]
