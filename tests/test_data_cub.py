"""CUB-200-2011 loading from a tiny tree in the official formats, and the class-balanced sampler."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, prepare_data_loader
from data_fixtures import CUB_CLASSES, CUB_TEST_CLASSES, CUB_TRAIN_CLASSES, cub_caption, cub_image_name, write_cub_tree

from hf_pcme.data.cub import load_cub
from hf_pcme.data.samplers import ClassBalancedBatchSampler
from hf_pcme.data.views import make_retrieval_split


@pytest.fixture
def cub_root(tmp_path):
    root = tmp_path / "cub"
    write_cub_tree(root, images_per_class=2, captions_per_image=10)
    return root


def test_zero_shot_split_keeps_class_sets_apart_with_ids_and_names(cub_root, tmp_path):
    cub = load_cub(cub_root, cache_dir=tmp_path / "cache")
    for split, classes in (("train", CUB_TRAIN_CLASSES), ("test", CUB_TEST_CLASSES)):
        rows = cub[split].select_columns(["image_id", "caption", "caption_id", "label", "class_id", "class_name"])
        expected_class_ids = {CUB_CLASSES.index(c) + 1 for c in classes}
        assert set(rows["class_id"]) == expected_class_ids
        assert len(rows) == 2 * 10 * len(classes)
        for row in rows:
            class_dir = CUB_CLASSES[row["class_id"] - 1]
            line = row["caption_id"] - 100 * row["image_id"]
            assert 0 <= line < 10 and row["caption"] == cub_caption(row["image_id"], line)
            assert row["label"] == row["class_id"] - 1
            assert row["class_name"] == class_dir.split(".", 1)[1].replace("_", " ")
    assert set(cub["train"]["class_id"]).isdisjoint(cub["test"]["class_id"])
    assert cub["train"].features["label"].names == list(CUB_CLASSES)
    assert cub["test"]["image_id"][::10] == [3, 8]  # images.txt order: ids of class 3 are 3 and 8
    image = cub["test"][0]["image"]
    assert image.size == (8, 8)


def test_retrieval_view_has_image_classes(cub_root, tmp_path):
    view = make_retrieval_split(load_cub(cub_root, cache_dir=tmp_path / "cache", split="train"))
    assert view.num_images == 8 and view.num_captions == 80
    assert view.image_classes.tolist() == [0, 1, 3, 4, 0, 1, 3, 4]
    assert np.array_equal(view.text_to_image, np.repeat(np.arange(8), 10))


def test_missing_files_error_naming_path_or_are_skipped_with_a_count(cub_root, tmp_path, caplog):
    (cub_root / "images" / cub_image_name(CUB_CLASSES[0], 1)).unlink()
    with pytest.raises(FileNotFoundError, match="Black_footed_Albatross_0001_101.jpg"):
        load_cub(cub_root, cache_dir=tmp_path / "cache")
    (cub_root / "text_c10" / cub_image_name(CUB_CLASSES[1], 2).replace(".jpg", ".txt")).unlink()
    with caplog.at_level(logging.WARNING, logger="hf_pcme.data"):
        train = load_cub(cub_root, cache_dir=tmp_path / "cache", missing_images="skip", split="train")
    assert "Skipped 1 CUB image" in caplog.text and "Skipped 1 CUB caption file" in caplog.text
    assert sorted(set(train["image_id"])) == [4, 5, 6, 7, 9, 10]


def test_missing_metadata_file_names_path_and_layout(cub_root, tmp_path):
    (cub_root / "testclasses.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)testclasses\.txt.*Expected layout"):
        load_cub(cub_root, cache_dir=tmp_path / "cache")


def test_malformed_metadata_line_is_a_clear_error(cub_root, tmp_path):
    with open(cub_root / "images.txt", "a") as handle:
        handle.write("not-a-number some/file.jpg\n")
    with pytest.raises(ValueError, match=r"images\.txt, line 11"):
        load_cub(cub_root, cache_dir=tmp_path / "cache")


def test_class_in_both_split_files_is_an_error(cub_root, tmp_path):
    with open(cub_root / "testclasses.txt", "a") as handle:
        handle.write(CUB_TRAIN_CLASSES[0] + "\n")
    with pytest.raises(ValueError, match="both"):
        load_cub(cub_root, cache_dir=tmp_path / "cache")


# --- ClassBalancedBatchSampler ----------------------------------------------------------------

CLASS_IDS = np.repeat(np.arange(12), [3, 1, 4, 2, 5, 3, 3, 2, 6, 1, 2, 4])  # 12 classes, uneven sizes


def test_every_global_batch_has_distinct_classes():
    sampler = ClassBalancedBatchSampler(CLASS_IDS, batch_size=5, seed=3, num_replicas=2, rank=None)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 * (len(CLASS_IDS) // 10)
    for start in range(0, len(batches), 2):
        rows = batches[start] + batches[start + 1]
        assert len(rows) == 10 and len(set(CLASS_IDS[rows].tolist())) == 10


def test_rows_of_a_class_are_not_repeated_before_all_were_used():
    sampler = ClassBalancedBatchSampler(CLASS_IDS, batch_size=6, seed=0, num_batches=20)
    drawn = [row for batch in sampler for row in batch]
    for c in range(12):
        sequence = [row for row in drawn if CLASS_IDS[row] == c]
        size = int((CLASS_IDS == c).sum())
        for start in range(0, len(sequence) - size + 1, size):
            assert sorted(sequence[start : start + size]) == np.flatnonzero(CLASS_IDS == c).tolist()


def test_batches_depend_only_on_seed_and_epoch():
    def epoch_batches(seed, epoch):
        sampler = ClassBalancedBatchSampler(CLASS_IDS, batch_size=4, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_batches(0, 1) == epoch_batches(0, 1)
    assert epoch_batches(0, 1) != epoch_batches(0, 2)
    assert epoch_batches(0, 1) != epoch_batches(1, 1)


def test_ranks_get_disjoint_slices_whose_union_is_the_global_batch():
    full = ClassBalancedBatchSampler(CLASS_IDS, batch_size=3, seed=7, num_replicas=2)
    per_rank = [
        list(ClassBalancedBatchSampler(CLASS_IDS, batch_size=3, seed=7, num_replicas=2, rank=rank)) for rank in (0, 1)
    ]
    global_batches = list(full.global_batches())
    assert len(per_rank[0]) == len(per_rank[1]) == len(global_batches)
    for step, batch in enumerate(global_batches):
        assert per_rank[0][step] + per_rank[1][step] == batch
        assert not set(per_rank[0][step]) & set(per_rank[1][step])


def test_accelerate_sharding_gives_each_process_its_slice_of_every_global_batch():
    sampler = ClassBalancedBatchSampler(CLASS_IDS, batch_size=3, seed=5, num_replicas=2)
    global_batches = list(sampler.global_batches())
    shards = [list(BatchSamplerShard(sampler, num_processes=2, process_index=r)) for r in (0, 1)]
    for step, batch in enumerate(global_batches):
        assert shards[0][step] == batch[:3] and shards[1][step] == batch[3:]
        assert len(set(CLASS_IDS[shards[0][step] + shards[1][step]].tolist())) == 6


def test_accelerate_prepared_loader_advances_the_epoch_on_every_rank_alike():
    dataset = torch.arange(len(CLASS_IDS))
    epochs_per_rank = []
    for rank in (0, 1):
        sampler = ClassBalancedBatchSampler(CLASS_IDS, batch_size=3, seed=11, num_replicas=2)
        loader = prepare_data_loader(
            torch.utils.data.DataLoader(dataset, batch_sampler=sampler), num_processes=2, process_index=rank
        )
        epochs_per_rank.append([[batch.tolist() for batch in loader] for _ in range(2)])
    for epoch in range(2):
        reference = ClassBalancedBatchSampler(CLASS_IDS, batch_size=3, seed=11, num_replicas=2)
        reference.set_epoch(epoch)
        for step, batch in enumerate(reference.global_batches()):
            assert epochs_per_rank[0][epoch][step] + epochs_per_rank[1][epoch][step] == batch
    assert epochs_per_rank[0][0] != epochs_per_rank[0][1]


def test_sampler_rejects_more_replicas_than_classes_allow():
    with pytest.raises(ValueError, match="number of classes"):
        ClassBalancedBatchSampler(CLASS_IDS, batch_size=7, num_replicas=2)
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedBatchSampler(CLASS_IDS, batch_size=2, num_replicas=2, rank=2)
