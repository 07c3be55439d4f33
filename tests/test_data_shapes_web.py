"""The web-like shapes mode: noisy tags derived from the scene, seeded, with the clean pixels."""

from __future__ import annotations

import numpy as np
import pytest

from hf_pcme.data import load_dataset_by_name
from hf_pcme.data.shapes import COLOURS, KINDS, SIZES, load_shapes
from hf_pcme.data.shapes_web import load_shapes_web, noisy_tags


def _scene_tags(shapes):
    return [f"{SIZES[s[2]]} {COLOURS[s[1]]} {KINDS[s[0]]}" for s in shapes]  # shapes rows: kind, colour, size, position


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes_web_cache")


def test_noise_free_tags_are_the_scene_and_pixels_are_those_of_shapes(cache):
    web = load_shapes_web(12, seed=3, image_size=32, tag_drop_rate=0, tag_swap_rate=0, tag_spurious_rate=0,
                          cache_dir=cache, split="train")
    clean = load_shapes(12, num_eval_images=0, seed=3, image_size=32, cache_dir=cache, split="train")
    assert len(web) == 12 and web["image_id"] == list(range(12))  # one row per image
    for row in range(12):
        item = web[row]
        expected = _scene_tags(item["shapes"])
        assert sorted(item["tags"]) == sorted(expected) and item["clean_tags"] == expected
        assert item["caption"] == ", ".join(item["tags"])
        assert np.array_equal(np.asarray(item["image"]), np.asarray(clean[5 * row]["image"]))


def test_each_kind_of_noise(cache):
    def rows(**rates):
        return load_shapes_web(60, seed=0, image_size=16, cache_dir=cache, split="train", **rates)[:]

    dropped = rows(tag_drop_rate=1.0, tag_swap_rate=0, tag_spurious_rate=0)
    for tags, clean in zip(dropped["tags"], dropped["clean_tags"]):
        assert len(tags) == 1 and tags[0] in clean  # never empty: one tag survives
    swapped = rows(tag_drop_rate=0, tag_swap_rate=1.0, tag_spurious_rate=0)
    for tags, clean in zip(swapped["tags"], swapped["clean_tags"]):
        assert len(tags) == len(clean)
        # Each tag is a clean tag with exactly one of its three words changed.
        for tag in tags:
            assert any(sum(a != b for a, b in zip(tag.split(), c.split())) == 1 for c in clean)
    spurious = rows(tag_drop_rate=0, tag_swap_rate=0, tag_spurious_rate=1.0)
    assert all(len(t) == len(c) + 1 for t, c in zip(spurious["tags"], spurious["clean_tags"]))
    # The rates change the tags, never the images.
    assert dropped["image"][0] == swapped["image"][0]


def test_drop_rate_matches_its_probability():
    rng = np.random.default_rng(0)
    scene = [(0, 1, 0, 0), (1, 2, 1, 1), (2, 3, 0, 2)]
    from hf_pcme.data.shapes import Shape

    shapes = [Shape(*s) for s in scene]
    kept = [len(noisy_tags(shapes, rng, 0.3, 0.0, 0.0)) for _ in range(4000)]
    # Expected tags kept: 3 * 0.7, plus the rescue of an all-dropped image (prob 0.3^3, one tag).
    expected = 3 * 0.7 + 0.3**3
    assert abs(np.mean(kept) - expected) < 0.05


def test_seeded_registered_and_checked(cache):
    a = load_dataset_by_name("shapes_web", num_images=5, image_size=16, cache_dir=cache)["train"]["caption"]
    b = load_shapes_web(5, image_size=16, cache_dir=cache, split="train")["caption"]
    assert a == b
    with pytest.raises(ValueError, match="tag_drop_rate"):
        load_shapes_web(5, tag_drop_rate=1.5, cache_dir=cache)
