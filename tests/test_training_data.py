"""Training rows: the per-image pixel cache gives exactly what on-the-fly processing gives."""

from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from hf_pcme.data import make_eval_transform, make_train_transform
from hf_pcme.testing import tiny_processor
from hf_pcme.training.config import load_recipe
from hf_pcme.training.data import PixelCache, TrainingRows, make_training_rows

SHAPES_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "shapes_pcme.yaml"
IMAGE_IDS = [107, 3, 55, 9, 2024, 61]  # not sorted, not contiguous
CAPTIONS_PER_IMAGE = 3


@pytest.fixture(scope="module")
def rows() -> Dataset:
    """Caption-level rows of six noise images (three captions each), in shuffled order."""
    rng = np.random.default_rng(0)
    images = {i: PILImage.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)) for i in IMAGE_IDS}
    order = rng.permutation(len(IMAGE_IDS) * CAPTIONS_PER_IMAGE)
    pairs = [(image_id, k) for image_id in IMAGE_IDS for k in range(CAPTIONS_PER_IMAGE)]
    pairs = [pairs[i] for i in order]
    features = Features({"image": Image(), "caption": Value("string"), "image_id": Value("int64"),
                         "caption_id": Value("int64")})
    return Dataset.from_dict(
        {
            "image": [images[image_id] for image_id, _ in pairs],
            "caption": [f"a caption {k} of image {image_id}" for image_id, k in pairs],
            "image_id": [image_id for image_id, _ in pairs],
            "caption_id": [image_id * 10 + k for image_id, k in pairs],
        },
        features=features,
    )


@pytest.fixture(scope="module")
def transform():
    return make_eval_transform(tiny_processor(image_size=32))


def test_cached_rows_equal_rows_processed_on_the_fly(rows, transform):
    cache = PixelCache.build(rows, transform, max_bytes=2**30, batch_size=4, progress=False)
    assert len(cache) == len(IMAGE_IDS)  # one tensor per image, not per caption
    indices = [17, 0, 5, 5, 12, 3]
    cached = TrainingRows(rows, transform, pixel_cache=cache).__getitems__(indices)
    plain = TrainingRows(rows, transform).__getitems__(indices)
    assert [sorted(row) for row in cached] == [sorted(row) for row in plain]
    for with_cache, without in zip(cached, plain):
        assert torch.equal(with_cache["pixel_values"], without["pixel_values"])
        for key in ("caption", "image_id", "caption_id"):
            assert with_cache[key] == without[key]


def test_lookup_follows_the_requested_ids(rows, transform):
    cache = PixelCache.build(rows, transform, max_bytes=2**30, progress=False)
    first_row = {image_id: rows["image_id"].index(image_id) for image_id in IMAGE_IDS}
    wanted = [61, 3, 61, 2024]
    expected = torch.stack([transform(rows[[first_row[i]]])["pixel_values"][0] for i in wanted])
    assert torch.equal(cache.lookup(wanted), expected)
    with pytest.raises(KeyError, match="8"):
        cache.lookup([3, 8])
    with pytest.raises(KeyError, match="5000"):
        cache.lookup([5000])  # past the largest id


def test_cache_over_the_memory_limit_is_not_built(rows, transform):
    one_image = 3 * 32 * 32 * 4
    assert PixelCache.build(rows, transform, max_bytes=len(IMAGE_IDS) * one_image - 1, progress=False) is None
    assert PixelCache.build(rows, transform, max_bytes=len(IMAGE_IDS) * one_image, progress=False) is not None


def test_cache_of_an_empty_split_is_not_built(rows, transform):
    assert PixelCache.build(rows.select([]), transform, max_bytes=2**30, progress=False) is None


def test_cache_refuses_augmentation(rows, transform):
    cache = PixelCache.build(rows, transform, max_bytes=2**30, progress=False)
    processor = tiny_processor(image_size=32)
    with pytest.raises(ValueError, match="augmentation"):
        TrainingRows(rows, transform, augment=lambda g: make_train_transform(processor, generator=g), pixel_cache=cache)


@pytest.mark.parametrize(
    ("overrides", "cached"),
    [
        ([], True),
        (["data.cache_pixel_values=false"], False),
        (["data.pixel_cache_max_gb=0.00001"], False),  # 10.7 KB < six 12 KB images
        (["data.augment=true", "data.name=coco"], False),  # random crops: nothing fixed to cache
    ],
)
def test_recipe_decides_whether_to_cache(rows, overrides, cached):
    recipe = load_recipe(SHAPES_RECIPE, ["data.image_size=32", *overrides])
    training_rows = make_training_rows(recipe, rows, tiny_processor(image_size=32), progress=False)
    assert (training_rows.pixel_cache is not None) == cached


def test_negative_cache_limit_is_rejected():
    with pytest.raises(ValueError, match="data.pixel_cache_max_gb"):
        load_recipe(SHAPES_RECIPE, ["data.pixel_cache_max_gb=-1"])
