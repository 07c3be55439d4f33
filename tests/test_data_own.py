"""Training on your own data: image folders, saved / Hub datasets, Flickr30K (Karpathy), tags mode.

Each test writes its source in the real format (metadata.jsonl, metadata.csv, a ``save_to_disk``
folder, Karpathy's dataset_flickr30k.json) under ``tmp_path`` and checks the caption-level rows
against what it wrote, computed here independently.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets
from hf_pcme.data import _caption_rows, load_dataset_by_name, make_retrieval_split
from hf_pcme.data._caption_rows import join_tags
from hf_pcme.data.flickr30k import load_flickr30k
from hf_pcme.data.hub import load_hub
from hf_pcme.data.imagefolder import load_imagefolder


def write_png(path: Path, seed: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), ((37 * seed) % 256, (91 * seed) % 256, 60)).save(path)


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


# Per split: (file name, captions). Whitespace in captions must be collapsed.
JSONL_SPLITS = {
    "train": [("a.png", ["a red  car", "a car on a road"]), ("b.png", ["two dogs"]),
              ("sub/c.png", ["a cat", "a small cat", " a cat on a mat "])],
    "validation": [("d.png", ["a boat"])],
    "test": [("e.png", ["a tree", "a tall tree"]), ("f.png", ["a house"])],
}


def write_jsonl_folder(root: Path, splits=JSONL_SPLITS, extra: dict | None = None) -> Path:
    seed = 0
    for split, items in splits.items():
        lines = []
        for name, captions in items:
            seed += 1
            write_png(root / split / name, seed)
            lines.append(json.dumps({"file_name": name, "captions": captions, **(extra or {}).get(name, {})}))
        (root / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def arrow_files_of_caption_rows(cache: Path) -> list[Path]:
    return [p for p in cache.rglob("*.arrow") if "caption_rows" in str(p)]


def test_imagefolder_jsonl_with_several_captions_per_image(tmp_path):
    root = write_jsonl_folder(tmp_path / "photos")
    splits = load_imagefolder(root, cache_dir=tmp_path / "cache")
    assert sorted(splits) == ["test", "train", "val"]  # "validation" is renamed "val"
    expected_caption_id = 0
    image_ids_seen = set()
    for split in ("train", "val", "test"):
        items = JSONL_SPLITS["validation" if split == "val" else split]
        rows = splits[split]
        expected = [(name, " ".join(c.split())) for name, captions in items for c in captions]
        assert list(zip(rows["image_key"], rows["caption"])) == [(f"{split if split != 'val' else 'validation'}/{n}", c)
                                                                 for n, c in expected]
        # One image id per file, shared by its captions, distinct across the whole dataset.
        ids = rows["image_id"]
        per_image = [ids[i] for i, (n, _) in enumerate(expected) if i == 0 or expected[i - 1][0] != n]
        assert len(set(per_image)) == len(items) and not image_ids_seen & set(per_image)
        image_ids_seen |= set(per_image)
        assert all(ids[i] == ids[i - 1] for i in range(1, len(ids)) if expected[i][0] == expected[i - 1][0])
        n = len(expected)
        assert rows["caption_id"] == list(range(expected_caption_id, expected_caption_id + n))
        expected_caption_id += n
    first = splits["train"][0]["image"]
    assert first.size == (8, 8) and first.getpixel((0, 0)) == (37, 91, 60)
    view = make_retrieval_split(splits["train"])
    assert view.num_images == 3 and view.text_to_image.tolist() == [0, 0, 1, 2, 2, 2]


def test_imagefolder_csv_rows_of_one_file_are_one_image(tmp_path):
    root = tmp_path / "csvfolder"
    for i in range(3):
        write_png(root / f"{i}.png", i)
    with open(root / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text"])
        writer.writerows([["0.png", "zero, first"], ["1.png", "one"], ["0.png", "zero again"], ["2.png", "two"]])
    train = load_dataset_by_name("imagefolder", data_dir=str(root), cache_dir=tmp_path / "cache")["train"]
    assert train["caption"] == ["zero, first", "one", "zero again", "two"]
    assert train["image_key"] == ["0.png", "1.png", "0.png", "2.png"]
    ids = train["image_id"]
    assert ids[0] == ids[2] and len({ids[0], ids[1], ids[3]}) == 3
    assert make_retrieval_split(train).num_images == 3


def test_tags_mode_joins_tags_in_stored_order(tmp_path):
    assert join_tags(["dog", " beach ", "dog", "", "frisbee"]) == "dog, beach, frisbee"
    assert join_tags("sky,  sea ,sky") == "sky, sea"
    assert join_tags(["a", "b"], " | ") == "a | b"
    root = write_jsonl_folder(
        tmp_path / "web", {"train": [("a.png", ["unused"]), ("b.png", ["unused"])]},
        extra={"a.png": {"tags": ["dog", "beach", "dog"]}, "b.png": {"tags": ["  ball", "park  "]}},
    )
    train = load_imagefolder(root, tags=True, cache_dir=tmp_path / "cache", split="train")
    assert train["caption"] == ["dog, beach", "ball, park"]  # one text per image, tags in stored order
    pipes = load_imagefolder(root, tags=True, tag_separator=" | ", cache_dir=tmp_path / "cache", split="train")
    assert pipes["caption"] == ["dog | beach", "ball | park"]
    # CSV: tags in one cell, comma-separated.
    csv_root = tmp_path / "csvtags"
    write_png(csv_root / "x.png", 1)
    (csv_root / "metadata.csv").write_text('file_name,tags\nx.png,"red, car, red"\n')
    assert load_imagefolder(csv_root, tags=True, cache_dir=tmp_path / "cache", split="train")["caption"] == ["red, car"]


def test_missing_image_errors_naming_file_or_is_skipped_and_nothing_half_written(tmp_path, caplog):
    root = write_jsonl_folder(tmp_path / "photos")
    (root / "test" / "e.png").unlink()
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match=r"test/e\.png"):
        load_imagefolder(root, cache_dir=cache)
    assert arrow_files_of_caption_rows(cache) == [] and not list(cache.rglob("*.incomplete"))
    with caplog.at_level(logging.WARNING, logger="hf_pcme.data"):
        test = load_imagefolder(root, cache_dir=cache, missing_images="skip", split="test")
    assert "Skipped 1 image" in caplog.text
    assert test["caption"] == ["a house"]


def test_non_image_file_is_a_clear_error_or_skipped(tmp_path):
    root = write_jsonl_folder(tmp_path / "photos")
    (root / "train" / "b.png").write_text("this is not a PNG")
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"b\.png .*not an image"):
        load_imagefolder(root, cache_dir=cache)
    assert arrow_files_of_caption_rows(cache) == []
    train = load_imagefolder(root, cache_dir=cache, missing_images="skip", split="train")
    assert "two dogs" not in train["caption"] and len(train) == 5


def test_empty_caption_errors_naming_image_and_column(tmp_path, caplog):
    splits = {"train": [("a.png", ["a car", "   "]), ("b.png", [])], "test": [("c.png", ["fine"])]}
    root = write_jsonl_folder(tmp_path / "photos", splits)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"a\.png.*empty caption in column 'captions'"):
        load_imagefolder(root, cache_dir=cache)
    assert arrow_files_of_caption_rows(cache) == []
    with caplog.at_level(logging.WARNING, logger="hf_pcme.data"):
        train = load_imagefolder(root, cache_dir=cache, empty_captions="skip", split="train")
    assert train["caption"] == ["a car"] and "Dropped 2 empty caption" in caplog.text


def test_unknown_column_lists_the_available_ones(tmp_path):
    root = write_jsonl_folder(tmp_path / "photos")
    with pytest.raises(ValueError, match=r"caption_column='sentence' .*available columns: image, captions"):
        load_imagefolder(root, caption_column="sentence", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"No tags column .*file_name, captions"):
        load_imagefolder(root, tags=True, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="metadata.jsonl or metadata.csv"):
        empty = tmp_path / "nometa"
        write_png(empty / "a.png", 1)
        load_imagefolder(empty, cache_dir=tmp_path / "cache")


def test_imagefolder_cache_is_reused_and_rebuilt_after_an_edit(tmp_path, monkeypatch):
    root = write_jsonl_folder(tmp_path / "photos")
    cache = tmp_path / "cache"
    load_imagefolder(root, cache_dir=cache)
    calls = []
    original = _caption_rows.CaptionRows._split_generators

    def counting(self, dl_manager):
        calls.append(1)
        return original(self, dl_manager)

    monkeypatch.setattr(_caption_rows.CaptionRows, "_split_generators", counting)
    again = load_imagefolder(root, cache_dir=cache, split="test")
    assert calls == [] and again["caption"] == ["a tree", "a tall tree", "a house"]
    metadata = root / "test" / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("a house", "a big house"))
    os.utime(metadata, ns=(1, 1))
    edited = load_imagefolder(root, cache_dir=cache, split="test")
    assert calls == [1] and edited["caption"][-1] == "a big house"


def _saved_dataset(tmp_path: Path) -> Path:
    """A DatasetDict in save_to_disk format: embedded PNG bytes, list-valued captions, string ids."""
    features = datasets.Features({
        "img": datasets.Image(), "sentences": datasets.List(datasets.Value("string")),
        "photo": datasets.Value("string"), "kind": datasets.Value("int64"),
    })
    train = datasets.Dataset.from_dict(
        {"img": [{"bytes": png_bytes(i), "path": None} for i in (1, 2, 3)],
         "sentences": [["one a", "one b"], ["two"], ["three a", "three  b", "three c"]],
         "photo": ["p1", "p2", "p3"], "kind": [0, 1, 0]},
        features=features,
    )
    validation = datasets.Dataset.from_dict(
        {"img": [{"bytes": png_bytes(9), "path": None}], "sentences": [["nine"]], "photo": ["p9"], "kind": [1]},
        features=features,
    )
    path = tmp_path / "saved"
    datasets.DatasetDict({"train": train, "validation": validation}).save_to_disk(str(path))
    return path


def test_hub_saved_dataset_with_list_valued_captions(tmp_path):
    path = _saved_dataset(tmp_path)
    splits = load_dataset_by_name("hub", data_dir=str(path), image_column="img", caption_column="sentences",
                                  id_column="photo", cache_dir=tmp_path / "cache")
    assert sorted(splits) == ["train", "val"]
    train = splits["train"]
    assert train["caption"] == ["one a", "one b", "two", "three a", "three b", "three c"]
    assert train["image_key"] == ["p1", "p1", "p2", "p3", "p3", "p3"]
    assert train["image_id"] == [0, 0, 1, 2, 2, 2] and splits["val"]["image_id"] == [3]
    assert train[2]["image"].getpixel((0, 0)) == (2, 0, 0)  # the bytes of row 2, decoded
    renamed = load_hub(path, image_column="img", caption_column="sentences", splits={"dev": "validation"},
                       cache_dir=tmp_path / "cache")
    assert list(renamed) == ["dev"] and renamed["dev"]["caption"] == ["nine"]


def test_hub_one_row_per_caption_grouped_by_integer_id_and_path_images(tmp_path):
    images = tmp_path / "imgs"
    for i in range(2):
        write_png(images / f"{i}.png", i)
    rows = datasets.Dataset.from_dict(
        {"file": ["0.png", "1.png", "0.png"], "text": ["cap a", "cap b", "cap c"], "cocoid": [40, 7, 40]}
    )
    path = tmp_path / "rows"
    rows.save_to_disk(str(path))
    train = load_hub(path, image_column="file", caption_column="text", id_column="cocoid", image_dir=images,
                     cache_dir=tmp_path / "cache", split="train")
    assert train["image_id"] == [40, 7, 40] and train["caption"] == ["cap a", "cap b", "cap c"]
    assert train[1]["image"].getpixel((0, 0)) == (37, 91, 60)
    stored = train.cast_column("image", datasets.Image(decode=False))
    assert stored[0]["image"]["path"] == str(images / "0.png") and stored[0]["image"]["bytes"] is None
    assert make_retrieval_split(train).num_images == 2


def test_hub_bad_columns_and_types_are_named(tmp_path):
    path = _saved_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"image_column='image' .*available columns: img, sentences, photo, kind"):
        load_hub(path, caption_column="sentences", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"caption_column='kind' .*expected captions"):
        load_hub(path, image_column="img", caption_column="kind", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"Split 'test' .*has: train, validation"):
        load_hub(path, image_column="img", caption_column="sentences", splits=["test"], cache_dir=tmp_path / "cache")
    assert arrow_files_of_caption_rows(tmp_path / "cache") == []


def _write_flickr(root: Path, write_images: bool = True) -> list[dict]:
    images = []
    sentid = 0
    for index, (flickr_id, split) in enumerate(
        [(1000092795, "train"), (10002456, "train"), (1000268201, "val"), (1000344755, "test"), (1000366164, "test")]
    ):
        sentences = []
        for k in range(5):
            raw = f"photo {flickr_id} caption {k}" + ("  ." if k == 4 else "")
            sentences.append({"tokens": raw.split(), "raw": raw, "imgid": index, "sentid": sentid})
            sentid += 1
        images.append({"sentids": [s["sentid"] for s in sentences], "imgid": index, "sentences": sentences,
                       "split": split, "filename": f"{flickr_id}.jpg"})
        if write_images:
            path = root / "flickr30k-images" / f"{flickr_id}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (index * 20, 0, 0)).save(path, format="JPEG")
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return images


def test_flickr30k_karpathy_split(tmp_path):
    root = tmp_path / "flickr30k"
    images = _write_flickr(root)
    splits = load_dataset_by_name("flickr30k", data_dir=str(root), cache_dir=tmp_path / "cache")
    for split in ("train", "val", "test"):
        mine = [im for im in images if im["split"] == split]
        rows = splits[split]
        assert rows["image_id"] == [int(im["filename"][:-4]) for im in mine for _ in range(5)]
        assert rows["caption_id"] == [s["sentid"] for im in mine for s in im["sentences"]]
        assert rows["caption"] == [" ".join(s["raw"].split()) for im in mine for s in im["sentences"]]
        assert rows["image_key"] == [im["filename"] for im in mine for _ in range(5)]
    view = make_retrieval_split(splits["test"])  # the 1K protocol: the whole test split at once
    assert view.num_images == 2 and view.num_captions == 10
    assert np.array_equal(view.text_to_image, np.repeat([0, 1], 5))


def test_flickr30k_missing_image_and_bad_json(tmp_path):
    root = tmp_path / "flickr30k"
    _write_flickr(root)
    (root / "flickr30k-images" / "1000344755.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1000344755\.jpg"):
        load_flickr30k(root, cache_dir=tmp_path / "cache")
    assert arrow_files_of_caption_rows(tmp_path / "cache") == []
    test = load_flickr30k(root, cache_dir=tmp_path / "cache", missing_images="skip", split="test")
    assert set(test["image_id"]) == {1000366164}
    (root / "dataset_flickr30k.json").write_text('{"images": [')
    with pytest.raises(ValueError, match=r"Malformed JSON in .*dataset_flickr30k\.json"):
        load_flickr30k(root, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="dataset_flickr30k.json"):
        load_flickr30k(tmp_path, cache_dir=tmp_path / "cache")


def test_hub_missing_image_path_and_empty_caption(tmp_path, caplog):
    images = tmp_path / "imgs"
    write_png(images / "here.png", 1)
    rows = datasets.Dataset.from_dict({"file": ["gone.png", "here.png"], "text": [["fine"], ["ok", ""]]})
    path = tmp_path / "rows"
    rows.save_to_disk(str(path))
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match=r"gone\.png"):
        load_hub(path, image_column="file", caption_column="text", image_dir=images, cache_dir=cache)
    with pytest.raises(ValueError, match=r"row 1 \(.*here\.png\) has an empty caption in column 'text'"):
        load_hub(path, image_column="file", caption_column="text", image_dir=images, cache_dir=cache,
                 missing_images="skip")
    assert arrow_files_of_caption_rows(cache) == []
    with caplog.at_level(logging.WARNING, logger="hf_pcme.data"):
        train = load_hub(path, image_column="file", caption_column="text", image_dir=images, cache_dir=cache,
                         missing_images="skip", empty_captions="skip", split="train")
    assert train["caption"] == ["ok"] and "Skipped 1 image" in caplog.text and "Dropped 1 empty caption" in caplog.text
