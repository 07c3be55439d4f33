"""Transforms applied on the fly, the retrieval collator, and the dataset registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fixtures import write_coco_tree, write_cub_tree
from PIL import Image

from hf_pcme.data import (
    RetrievalCollator,
    load_coco,
    load_cub,
    load_dataset_by_name,
    load_shapes,
    make_eval_transform,
    make_train_transform,
    train_transform_for,
)
from hf_pcme.data.shapes import caption_specs, image_specs, is_plausible
from hf_pcme.data.transforms import augment, random_resized_crop_box
from hf_pcme.testing import tiny_processor


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return load_shapes(8, num_eval_images=4, seed=0, cache_dir=tmp_path_factory.mktemp("shapes_cache"))


@pytest.fixture(scope="module")
def processor(shapes):
    return tiny_processor(texts=list(shapes["train"]["caption"]), image_size=32)


def test_collator_batches_model_inputs_ids_and_exact_plausibility(shapes, processor):
    train = shapes["train"].with_transform(make_eval_transform(processor))
    loader = torch.utils.data.DataLoader(train, batch_size=7, shuffle=False, collate_fn=RetrievalCollator(processor))
    batch = next(iter(loader))
    raw = shapes["train"].select(range(7))
    assert batch["pixel_values"].shape == (7, 3, 32, 32)
    expected_pixels = processor(images=[image for image in raw["image"]], return_tensors="pt")["pixel_values"]
    assert torch.allclose(batch["pixel_values"], expected_pixels)
    expected_text = processor(text=list(raw["caption"]), return_tensors="pt", padding=True)
    assert torch.equal(batch["input_ids"], expected_text["input_ids"])
    assert torch.equal(batch["attention_mask"], expected_text["attention_mask"])
    assert batch["image_ids"].tolist() == raw["image_id"] and batch["image_ids"].dtype == torch.long
    assert batch["caption_ids"].tolist() == raw["caption_id"]
    assert batch["specificity"].tolist() == [0, 1, 2, 3, 4, 0, 1]
    images, captions = image_specs(raw), caption_specs(raw)
    expected_mask = [[is_plausible(captions[j], images[i]) for j in range(7)] for i in range(7)]
    assert batch["plausible_mask"].tolist() == expected_mask


def test_collator_processes_raw_images_and_passes_cub_labels(tmp_path):
    write_cub_tree(tmp_path / "cub")
    train = load_cub(tmp_path / "cub", cache_dir=tmp_path / "cache", split="train")
    processor = tiny_processor(texts=list(train["caption"]), image_size=16)
    rows = [train[i] for i in (0, 10, 20)]
    batch = RetrievalCollator(processor)(rows)
    assert batch["labels"].tolist() == [row["label"] for row in rows] == [0, 1, 3]
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert "plausible_mask" not in batch


def test_grayscale_coco_images_become_three_channels(tmp_path):
    write_coco_tree(tmp_path / "coco")
    train = load_coco(tmp_path / "coco", cache_dir=tmp_path / "cache", split="train")
    processor = tiny_processor(image_size=16)
    assert train[10]["image"].mode == "L"
    for transform in (make_eval_transform(processor), make_train_transform(processor)):
        out = train.with_transform(transform)[10:12]
        assert [tuple(p.shape) for p in out["pixel_values"]] == [(3, 16, 16)] * 2
        assert out["caption_id"] == [3000, 3001] and "image" not in out


def test_crop_box_stays_inside_and_covers_the_requested_area():
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        left, top, right, bottom = random_resized_crop_box(40, 30, (0.3, 0.9), (0.5, 2.0), generator)
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30
        fraction = (right - left) * (bottom - top) / (40 * 30)
        assert 0.25 <= fraction <= 0.95  # rounding to whole pixels moves it a little


def test_full_crop_and_flip_give_the_mirrored_image():
    image = Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))
    flips = []
    for seed in range(20):
        out = augment(image, 8, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True,
                      generator=torch.Generator().manual_seed(seed))
        if np.array_equal(np.asarray(out), np.asarray(image)[:, ::-1]):
            flips.append(True)
        else:
            assert np.array_equal(np.asarray(out), np.asarray(image))
            flips.append(False)
    assert 0 < sum(flips) < 20  # both outcomes happen


def test_train_transform_is_reproducible_with_a_generator(shapes, processor):
    batch = shapes["train"][:3]

    def run(seed):
        transform = make_train_transform(processor, generator=torch.Generator().manual_seed(seed))
        return torch.stack(transform(dict(batch))["pixel_values"])

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_shapes_training_transform_has_no_geometric_augmentation(shapes, processor):
    batch = shapes["train"][:4]
    torch.manual_seed(0)
    first = torch.stack(train_transform_for("shapes", processor)(dict(batch))["pixel_values"])
    torch.manual_seed(1)
    second = torch.stack(train_transform_for("shapes", processor)(dict(batch))["pixel_values"])
    evaluated = torch.stack(make_eval_transform(processor)(dict(batch))["pixel_values"])
    assert torch.equal(first, second) and torch.equal(first, evaluated)


def test_registry_loads_by_name_and_lists_choices(tmp_path):
    train = load_dataset_by_name("shapes", num_images=3, num_eval_images=0, cache_dir=tmp_path, split="train")
    assert len(train) == 15
    with pytest.raises(ValueError, match=r"coco, cub, .*imagefolder, .*shapes"):
        load_dataset_by_name("imagenet")
