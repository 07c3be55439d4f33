"""The generated shapes dataset: determinism, image/caption agreement, exact plausibility."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hf_pcme.data.shapes import (
    COLOURS,
    KINDS,
    POSITIONS,
    SIZES,
    CaptionSpec,
    Phrase,
    Shape,
    caption_specs,
    caption_text,
    generate_example,
    image_specs,
    is_plausible,
    load_shapes,
    parse_caption,
    plausibility_matrix,
)
from hf_pcme.data.views import make_retrieval_split

COUNT_WORDS = {"one": 1, "two": 2, "three": 3}


def brute_force_plausible(text: str, shapes: list[list[int]]) -> bool:
    """Read the caption text word by word and try every assignment of phrases to distinct shapes."""
    words_of_shapes = [(KINDS[k], COLOURS[c], SIZES[s], POSITIONS[p]) for k, c, s, p in shapes]
    if ": " in text:
        head, text = text.split(": ")
        if COUNT_WORDS[head.split()[0]] != len(shapes):
            return False
    phrases = [] if text == "some shapes" else text.replace(", ", " and ").split(" and ")

    def holds(phrase: str, shape: tuple[str, str, str, str]) -> bool:
        kind, colour, size, position = shape
        if " at the " in phrase:
            phrase, where = phrase.split(" at the ")
            if where != position:
                return False
        *adjectives, noun = phrase.split()[1:]
        return noun in ("shape", kind) and all(adjective in (colour, size) for adjective in adjectives)

    return any(
        all(holds(phrase, words_of_shapes[j]) for phrase, j in zip(phrases, chosen))
        for chosen in itertools.permutations(range(len(shapes)), len(phrases))
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return load_shapes(60, num_eval_images=30, seed=3, cache_dir=tmp_path_factory.mktemp("shapes_cache"))


def test_matrix_equals_brute_force_over_all_pairs(shapes):
    split = shapes["val"]
    images = split.select_columns(["image_id", "shapes"]).to_dict()
    captions = split.select_columns(["caption"])["caption"]
    unique_shapes = list({i: s for i, s in zip(images["image_id"], images["shapes"])}.values())
    expected = np.array([[brute_force_plausible(c, s) for c in captions] for s in unique_shapes])
    view = make_retrieval_split(split)
    assert np.array_equal(view.plausibility.matrix(chunk_size=7), expected)
    specs = caption_specs(split)
    image_spec_list = image_specs(view.images)
    assert np.array_equal(plausibility_matrix(specs, image_spec_list, chunk_size=11), expected)
    assert all(is_plausible(specs[j], image_spec_list[i]) == expected[i, j]
               for i in range(0, len(unique_shapes), 3) for j in range(0, len(captions), 5))
    rows, columns = np.array([4, 0, 17]), np.array([9, 3, 100, 101])
    assert np.array_equal(view.plausibility(rows, columns), expected[np.ix_(rows, columns)])
    assert np.array_equal(view.plausibility.plausible_images_per_caption(chunk_size=13), expected.sum(axis=0))


def test_every_caption_is_plausible_for_its_own_image_and_vaguer_captions_for_more(shapes):
    view = make_retrieval_split(shapes["train"])
    matrix = view.plausibility.matrix()
    assert matrix[view.text_to_image, np.arange(view.num_captions)].all()
    rate = [matrix[:, view.caption_specificity == level].mean() for level in range(5)]
    assert rate == sorted(rate) and rate[0] < rate[2] < rate[3] < rate[4] == 1.0


def test_semantics_by_hand():
    red_circle_tl, blue_square_br = Shape(0, 0, 0, 0), Shape(1, 2, 1, 3)
    image = (red_circle_tl, blue_square_br)
    assert is_plausible(parse_caption("a red shape"), image)
    assert is_plausible(parse_caption("a circle and a blue square"), image)
    assert not is_plausible(parse_caption("a red shape and a circle"), image)  # needs two distinct shapes
    assert is_plausible(parse_caption("two shapes: a small red circle at the top left and a large blue square"), image)
    assert not is_plausible(parse_caption("one shape: a red circle"), image)  # the count is a statement too
    assert not is_plausible(parse_caption("a blue square at the top left"), image)
    assert is_plausible(parse_caption("some shapes"), (red_circle_tl,))


def test_caption_text_round_trips_through_the_parser(shapes):
    split = shapes["train"]
    for text, spec in zip(split["caption"], caption_specs(split)):
        assert parse_caption(text) == spec and caption_text(spec) == text
    with pytest.raises(ValueError, match="Cannot parse"):
        parse_caption("a purple hexagon")
    with pytest.raises(ValueError, match="announces 3"):
        parse_caption("three shapes: a red circle")


def test_same_seed_same_pixels_and_captions_different_seed_different(tmp_path):
    a = load_shapes(12, num_eval_images=0, seed=5, cache_dir=tmp_path / "a")["train"]
    b = load_shapes(20, num_eval_images=0, seed=5, cache_dir=tmp_path / "b")["train"]  # a prefix of the same stream
    c = load_shapes(12, num_eval_images=0, seed=6, cache_dir=tmp_path / "c")["train"]
    assert a["caption"] == b["caption"][: len(a)]
    for i in range(0, len(a), 5):
        assert np.array_equal(np.asarray(a[i]["image"]), np.asarray(b[i]["image"]))
    assert a["caption"] != c["caption"]


def test_pixels_agree_with_the_shape_specs():
    """Each occupied grid cell holds pixels of the shape's colour, more for large shapes; empty cells none."""
    rgb = {"red": (220, 50, 47), "green": (60, 180, 75), "blue": (40, 100, 230), "yellow": (240, 210, 40)}
    for index in range(40):
        example = generate_example(seed=1, split="train", index=index, image_size=64)
        pixels = np.asarray(example.image).astype(int)
        by_position = {shape.position: shape for shape in example.shapes}
        for position in range(4):
            row, column = divmod(position, 2)
            cell = pixels[row * 32 : (row + 1) * 32, column * 32 : (column + 1) * 32]
            coloured = (cell.max(axis=2) > 80).sum()
            if position not in by_position:
                assert coloured == 0
                continue
            shape = by_position[position]
            close = (np.abs(cell - np.array(rgb[COLOURS[shape.colour]])).max(axis=2) <= 16).sum()
            assert close == coloured > 0
            assert (coloured > 150) == (SIZES[shape.size] == "large")


def test_generation_is_fast_enough_and_rows_are_consistent(shapes):
    train = shapes["train"]
    assert len(train) == 60 * 5 and len(shapes["test"]) == 30 * 5
    rows = train.select_columns(["image_id", "caption_id", "specificity", "num_shapes", "shapes"])
    assert rows["specificity"][:10] == [0, 1, 2, 3, 4] * 2
    assert len(set(rows["caption_id"])) == len(train)
    assert all(n == len(s) and 1 <= n <= 3 for n, s in zip(rows["num_shapes"], rows["shapes"]))
    assert set(shapes["val"]["image_id"]).isdisjoint(rows["image_id"])


def test_bad_arguments_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        load_shapes(0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="chunk_size"):
        plausibility_matrix([CaptionSpec((Phrase(kind=0),))], [(Shape(0, 0, 0, 0),)], chunk_size=0)
