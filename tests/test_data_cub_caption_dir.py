"""CUB as users download it: ``CUB_200_2011/`` and Reed et al.'s ``cvpr2016_cub/`` side by side."""

from __future__ import annotations

import shutil

import pytest
from data_fixtures import CUB_CLASSES, cub_caption, cub_image_name, write_cub_tree

from hf_pcme.data.cub import load_cub


@pytest.fixture
def downloaded(tmp_path):
    """Two folders: the dataset site's CUB_200_2011/ and cvpr2016_cub/ (text_c10 + class split)."""
    images_root = tmp_path / "CUB_200_2011"
    write_cub_tree(images_root, images_per_class=2, captions_per_image=10)
    captions_root = tmp_path / "cvpr2016_cub"
    captions_root.mkdir()
    shutil.move(images_root / "text_c10", captions_root / "text_c10")
    for name in ("trainvalclasses.txt", "testclasses.txt"):
        shutil.move(images_root / name, captions_root / name)
    return images_root, captions_root


def _caption_rows(split):
    return sorted(zip(split["image_id"], split["caption_id"], split["caption"]))


@pytest.mark.parametrize("which", ["text_c10", "parent"])
def test_separate_caption_dir_gives_the_same_rows_as_one_folder(downloaded, tmp_path, which):
    images_root, captions_root = downloaded
    caption_dir = captions_root / "text_c10" if which == "text_c10" else captions_root
    cub = load_cub(images_root, caption_dir=caption_dir, cache_dir=tmp_path / "cache")
    single = tmp_path / "single"
    write_cub_tree(single, images_per_class=2, captions_per_image=10)
    expected = load_cub(single, cache_dir=tmp_path / "cache")
    for split in ("train", "test"):
        assert _caption_rows(cub[split]) == _caption_rows(expected[split])
        assert cub[split]["class_id"] == expected[split]["class_id"]
    row = cub["test"][0]
    assert row["caption"] == cub_caption(row["image_id"], 0)


def test_caption_dir_is_read_not_data_dir(downloaded, tmp_path):
    images_root, captions_root = downloaded
    text_path = captions_root / "text_c10" / cub_image_name(CUB_CLASSES[2], 3).replace(".jpg", ".txt")
    text_path.write_text("a line only the caption folder has\n")
    test = load_cub(images_root, caption_dir=captions_root / "text_c10", cache_dir=tmp_path / "c", split="test")
    assert test.filter(lambda r: r["image_id"] == 3)["caption"] == ["a line only the caption folder has"]


def test_missing_captions_without_caption_dir_shows_both_folders(downloaded, tmp_path):
    images_root, _ = downloaded
    with pytest.raises(FileNotFoundError, match=r"(?s)text_c10.*CUB_200_2011/.*cvpr2016_cub/.*caption_dir"):
        load_cub(images_root, cache_dir=tmp_path / "cache")


def test_caption_dir_that_does_not_exist_is_named(downloaded, tmp_path):
    images_root, captions_root = downloaded
    with pytest.raises(FileNotFoundError, match=r"CUB caption_dir not found: .*nowhere"):
        load_cub(images_root, caption_dir=captions_root / "nowhere", cache_dir=tmp_path / "cache")


def test_missing_caption_file_in_caption_dir_is_named(downloaded, tmp_path):
    images_root, captions_root = downloaded
    name = cub_image_name(CUB_CLASSES[0], 1).replace(".jpg", ".txt")
    (captions_root / "text_c10" / name).unlink()
    with pytest.raises(FileNotFoundError, match=name.split("/")[1]):
        load_cub(images_root, caption_dir=captions_root, cache_dir=tmp_path / "cache")


def test_recipe_data_options_pass_caption_dir(downloaded, tmp_path):
    from hf_pcme.training.config import load_recipe
    from hf_pcme.training.data import load_splits

    images_root, captions_root = downloaded
    recipe = load_recipe(
        "configs/cub_pcme.yaml",
        [
            f"data.data_dir={images_root}",
            f"data.options={{caption_dir: {captions_root / 'text_c10'}, cache_dir: {tmp_path / 'cache'}}}",
        ],
    )
    train, test = load_splits(recipe)
    assert len(train) == 80 and len(test) == 20
    assert set(test["class_id"]) == {CUB_CLASSES.index("003.Sooty_Albatross") + 1}
