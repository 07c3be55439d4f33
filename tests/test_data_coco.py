"""COCO (Karpathy split) loading from a tiny tree in the official formats, and the JSON streamer."""

from __future__ import annotations

import json
import logging
import os
import random

import numpy as np
import pytest
from data_fixtures import CocoImage, default_coco_images, expected_multi_hot, write_coco_tree

import datasets
from hf_pcme.data import coco as coco_module
from hf_pcme.data._json_stream import MalformedJSONError, iter_json_object
from hf_pcme.data.coco import load_coco
from hf_pcme.data.transforms import to_rgb
from hf_pcme.data.views import make_retrieval_split


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    write_coco_tree(root)
    return root


def _karpathy_captions(images: list[CocoImage], splits: tuple[str, ...]) -> list[tuple[int, int]]:
    """(image id, COCO caption id) in file order, for the captions the Karpathy split keeps."""
    return [
        (im.image_id, ann_id)
        for im in images
        if im.karpathy_split in splits
        for ann_id, _, karpathy_text in im.captions
        if karpathy_text is not None
    ]


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.randint(-10**12, 10**12)
    if kind == 1:
        return rng.choice([1.5e-7, -2.25, 3.0, 12345.678])
    if kind == 2:
        return rng.choice(["", "plain", 'quote " and \\ backslash', "caf\u00e9 \u2603 \n newline", "x" * 50])
    if kind == 3:
        return rng.choice([True, False, None])
    if kind in (4, 5):
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {f"k{i}": _random_json(rng, depth + 1) for i in range(rng.randrange(4))}


@pytest.mark.parametrize("chunk_chars", [1, 7, 64, 1 << 20])
def test_json_stream_reproduces_json_load_for_any_chunk_size(tmp_path, chunk_chars):
    rng = random.Random(chunk_chars)
    document = {
        "info": _random_json(rng),
        "images": [{"id": rng.randint(0, 10**9), "name": "COCO_x.jpg"} for _ in range(30)],
        "annotations": [_random_json(rng) for _ in range(40)],
        "empty": [],
        "scalar": 1234567,
    }
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(document, indent=rng.choice([None, 2])))
    rebuilt: dict = {}
    for key, value, is_item in iter_json_object(path, ("images", "annotations", "empty"), chunk_chars=chunk_chars):
        if is_item:
            rebuilt.setdefault(key, []).append(value)
        else:
            rebuilt[key] = value
    rebuilt.setdefault("empty", [])
    assert rebuilt == json.loads(path.read_text())


def test_json_stream_names_file_and_line_of_malformed_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"images": [\n {"id": 1},\n {"id": 2,,}\n]}')
    with pytest.raises(MalformedJSONError, match=r"bad\.json at line 3"):
        list(iter_json_object(path, ("images",), chunk_chars=4))
    path.write_text('{"images": [{"id": 1}')  # truncated file
    with pytest.raises(MalformedJSONError, match="bad.json"):
        list(iter_json_object(path, ("images",)))


def test_splits_hold_karpathy_images_and_coco_caption_ids(coco_root, tmp_path):
    images = default_coco_images()
    coco = load_coco(coco_root, cache_dir=tmp_path / "cache")
    expected_splits = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
    for split, karpathy_splits in expected_splits.items():
        rows = coco[split].select_columns(["image_id", "caption_id"])
        got = list(zip(rows["image_id"], rows["caption_id"]))
        assert got == _karpathy_captions(images, karpathy_splits)
    # The duplicate caption "two giraffes" maps to two distinct annotations; the sixth caption is left out.
    train = coco["train"].select_columns(["image_id", "caption_id", "caption"])
    giraffe = [(c, t) for i, c, t in zip(train["image_id"], train["caption_id"], train["caption"]) if i == 25]
    assert giraffe == [(2001, "A giraffe eating leaves."), (2002, "a tall giraffe"), (2003, "two giraffes"),
                       (2004, "two giraffes"), (2005, "a giraffe in a zoo")]
    assert sorted(set(coco["train"]["karpathy_split"])) == ["restval", "train"]
    assert coco["train"].features["caption_id"].dtype == "int64"


def test_multi_hot_labels_follow_sorted_category_ids(coco_root, tmp_path):
    coco = load_coco(coco_root, cache_dir=tmp_path / "cache")
    by_image = {im.image_id: im for im in default_coco_images()}
    for split in ("train", "val", "test"):
        rows = coco[split].select_columns(["image_id", "labels_multi_hot"])
        for image_id, labels in zip(rows["image_id"], rows["labels_multi_hot"]):
            assert labels == expected_multi_hot(by_image[image_id].category_ids)
    # By hand: category 90 is the 80th (last) category, 1 the first; image 73 has no instance annotation.
    first = coco["train"].select_columns(["labels_multi_hot"])[0]["labels_multi_hot"]
    assert len(first) == 80 and first[0] == 1 and first[79] == 1 and sum(first) == 2
    val = coco["val"].select_columns(["image_id", "labels_multi_hot"])
    assert all(sum(labels) == 0 for i, labels in zip(val["image_id"], val["labels_multi_hot"]) if i == 73)


def test_images_are_paths_decoded_lazily_and_grayscale_converts(coco_root, tmp_path):
    train = load_coco(coco_root, cache_dir=tmp_path / "cache", split="train")
    stored = train.cast_column("image", datasets.Image(decode=False))
    expected_path = coco_root / "train2014" / "COCO_train2014_000000000009.jpg"
    assert stored[0]["image"] == {"bytes": None, "path": str(expected_path)}
    gray = train[10]["image"]  # image 42 was written as a grayscale JPEG
    assert train[10]["image_id"] == 42 and gray.mode == "L"
    assert to_rgb(gray).mode == "RGB" and to_rgb(gray).size == gray.size


def test_second_load_reads_the_arrow_cache_and_edits_invalidate_it(coco_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_coco(coco_root, cache_dir=cache)
    calls = []
    original = coco_module.CocoKarpathy._split_generators

    def counting(self, dl_manager):
        calls.append(1)
        return original(self, dl_manager)

    monkeypatch.setattr(coco_module.CocoKarpathy, "_split_generators", counting)
    second = load_coco(coco_root, cache_dir=cache)
    assert calls == [] and second["test"]["caption_id"] == first["test"]["caption_id"]
    captions = coco_root / "annotations" / "captions_val2014.json"
    document = json.loads(captions.read_text())
    for annotation in document["annotations"]:
        if annotation["id"] == 7000:
            annotation["id"] = 7777
    captions.write_text(json.dumps(document))
    os.utime(captions, ns=(1, 1))  # a different mtime even on coarse-grained file systems
    third = load_coco(coco_root, cache_dir=cache)
    assert calls == [1] and third["test"]["caption_id"][5] == 7777


def test_retrieval_view_groups_captions_by_image(coco_root, tmp_path):
    view = make_retrieval_split(load_coco(coco_root, cache_dir=tmp_path / "cache", split="test"))
    assert view.images["image_id"] == [34, 74]
    assert view.num_captions == 10
    caption_images = np.array(view.captions["image_id"])
    assert np.array_equal(np.array(view.images["image_id"])[view.text_to_image], caption_images)
    assert view.image_labels.shape == (2, 80)
    assert view.image_labels.tolist() == [expected_multi_hot([24]), expected_multi_hot([18, 3, 1])]
    assert [rows.tolist() for rows in view.captions_of_image()] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_missing_folder_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)nowhere.*annotations/captions_train2014\.json"):
        load_coco(tmp_path / "nowhere", cache_dir=tmp_path / "cache")
    root = tmp_path / "coco"
    write_coco_tree(root)
    (root / "annotations" / "instances_val2014.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"instances_val2014\.json"):
        load_coco(root, cache_dir=tmp_path / "cache")


def test_malformed_json_is_a_clear_error(coco_root, tmp_path):
    path = coco_root / "annotations" / "captions_val2014.json"
    path.write_text(path.read_text()[:-40])
    with pytest.raises(ValueError, match=r"Malformed JSON in .*captions_val2014\.json"):
        load_coco(coco_root, cache_dir=tmp_path / "cache")


def test_caption_of_unknown_image_is_a_clear_error(coco_root, tmp_path):
    path = coco_root / "annotations" / "captions_train2014.json"
    document = json.loads(path.read_text())
    document["annotations"].append({"image_id": 424242, "id": 99, "caption": "orphan"})
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"annotation id 99 -> image_id 424242"):
        load_coco(coco_root, cache_dir=tmp_path / "cache")


def test_unmatched_karpathy_sentence_errors_or_is_skipped_with_a_count(tmp_path, caplog):
    images = default_coco_images()
    ann_id, text, _ = images[0].captions[2]
    images[0].captions[2] = (ann_id, text, "a sentence that is in no COCO file")
    root = tmp_path / "coco"
    write_coco_tree(root, images)
    with pytest.raises(ValueError, match=r"sentid=2 of image cocoid=9 .*a sentence that is in no COCO file"):
        load_coco(root, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="hf_pcme.data"):
        train = load_coco(root, cache_dir=tmp_path / "cache", unmatched_captions="skip", split="train")
    assert "Dropped 1 Karpathy sentence" in caplog.text
    assert 1002 not in train["caption_id"] and len(train) == 14


def test_missing_image_errors_naming_file_or_is_skipped_with_a_count(coco_root, tmp_path, caplog):
    missing = coco_root / "val2014" / "COCO_val2014_000000000074.jpg"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000074.jpg"):
        load_coco(coco_root, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="hf_pcme.data"):
        test = load_coco(coco_root, cache_dir=tmp_path / "cache", missing_images="skip", split="test")
    assert "Skipped 1 COCO image" in caplog.text
    assert set(test["image_id"]) == {34}
    unchecked = load_coco(coco_root, cache_dir=tmp_path / "cache", missing_images="unchecked", split="test")
    assert set(unchecked["image_id"]) == {34, 74}


def test_bad_arguments_raise_value_errors(coco_root, tmp_path):
    with pytest.raises(ValueError, match="missing_images"):
        load_coco(coco_root, cache_dir=tmp_path / "cache", missing_images="ignore")
    with pytest.raises(ValueError, match="split"):
        load_coco(coco_root, cache_dir=tmp_path / "cache", split="restval")
