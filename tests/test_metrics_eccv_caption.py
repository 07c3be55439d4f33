"""protocol="eccv_caption" / "cxc" equal the eccv_caption package's own numbers on the same scores."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

eccv_caption = pytest.importorskip("eccv_caption")

from hf_pcme.metrics import evaluate_retrieval  # noqa: E402
from hf_pcme.metrics.eccv_caption import load_positives, pcmepp_table  # noqa: E402

MODULE_PATH = Path(__file__).resolve().parents[1] / "metrics" / "pcme_retrieval"


@pytest.fixture(scope="module")
def case():
    """A subset of the real COCO 5K test ids (ECCV queries in both directions) with random scores."""
    rng = np.random.default_rng(0)
    original, eccv = load_positives("original"), load_positives("eccv")
    image_queries = sorted(eccv["i2t"])[:40:2]
    caption_queries = sorted(eccv["t2i"])[::67][:20]
    images = list(dict.fromkeys(image_queries + [original["t2i"][c][0] for c in caption_queries]))
    images += [i for i in sorted(original["i2t"])[::250] if i not in images]  # some non-query images
    text_ids = [c for i in images for c in original["i2t"][i]]
    text_to_image = np.repeat(np.arange(len(images)), 5)
    scores = rng.standard_normal((len(images), len(text_ids))).astype(np.float32)
    return np.array(images), np.array(text_ids), text_to_image, scores


def eccv_caption_reference(images, text_ids, scores):
    """The package's own Metrics on the same rankings, its positives restricted to the given queries."""
    metrics = eccv_caption.Metrics()
    image_set, text_set = set(images.tolist()), set(text_ids.tolist())
    for attribute in ("eccv_gts", "cxc_gts"):
        gts = getattr(metrics, attribute)
        setattr(metrics, attribute, {
            "i2t": {q: v for q, v in gts["i2t"].items() if q in image_set},
            "t2i": {q: v for q, v in gts["t2i"].items() if q in text_set},
        })  # fmt: skip
    retrieved = {
        "i2t": {int(images[i]): text_ids[np.argsort(-scores[i], kind="stable")].tolist() for i in range(len(images))},
        "t2i": {int(text_ids[t]): images[np.argsort(-scores[:, t], kind="stable")].tolist() for t in range(len(text_ids))},
    }
    eccv = metrics.eccv_metrics(retrieved, "all")
    expected = {}
    for direction in ("i2t", "t2i"):
        expected[f"eccv_{direction}_map@r"] = 100 * eccv["eccv_map_at_r"][direction]
        expected[f"eccv_{direction}_rp"] = 100 * eccv["eccv_rprecision"][direction]
        expected[f"eccv_{direction}_r@1"] = 100 * eccv["eccv_r1"][direction]
        for k in (1, 5, 10):
            expected[f"cxc_{direction}_r@{k}"] = 100 * metrics.cxc_recalls(retrieved, "all", K=k)[direction]
    return expected


@pytest.fixture(scope="module")
def reference(case):
    images, text_ids, _, scores = case
    return eccv_caption_reference(images, text_ids, scores)


def test_eccv_protocol_equals_the_eccv_caption_package(case, reference):
    images, text_ids, text_to_image, scores = case
    expected = reference
    result = evaluate_retrieval(
        scores=scores, text_to_image=text_to_image, image_ids=images, text_ids=text_ids, protocol="eccv_caption"
    )
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key
    # the subset leaves many verified positives outside the ranked items: R must still count them
    assert 0 < result["eccv_i2t_rp"] < 30
    plain = evaluate_retrieval(scores=scores, text_to_image=text_to_image)
    assert all(result[key] == value for key, value in plain.items())


def test_cxc_protocol_has_only_cxc_keys(case, reference):
    images, text_ids, text_to_image, scores = case
    expected = reference
    result = evaluate_retrieval(
        scores=scores, text_to_image=text_to_image, image_ids=images, text_ids=text_ids, protocol="cxc", ks=(1, 5)
    )
    assert not any(key.startswith("eccv_") for key in result)
    for key in ("cxc_i2t_r@1", "cxc_t2i_r@1", "cxc_i2t_r@5", "cxc_t2i_r@5"):
        assert result[key] == pytest.approx(expected[key], abs=1e-9)


def test_evaluate_module_computes_eccv_caption_offline(case, reference):
    evaluate = pytest.importorskip("evaluate")
    images, text_ids, text_to_image, scores = case
    metric = evaluate.load(str(MODULE_PATH))
    result = metric.compute(
        text_to_image=text_to_image.tolist(), scores=scores, image_ids=images, text_ids=text_ids, protocol="eccv_caption"
    )
    expected = reference
    assert result["eccv_t2i_map@r"] == pytest.approx(expected["eccv_t2i_map@r"], abs=1e-9)
    table = pcmepp_table(result)
    assert "ECCV mAP@R" in table and "| mean" in table


def test_subset_warns_and_ids_are_required(case, caplog):
    images, text_ids, text_to_image, scores = case
    with caplog.at_level(logging.WARNING, logger="hf_pcme.metrics.eccv_caption"):
        evaluate_retrieval(scores=scores, text_to_image=text_to_image, image_ids=images, text_ids=text_ids,
                           protocol="cxc", ks=(1,))  # fmt: skip
    assert "not comparable with published" in caplog.text
    with pytest.raises(ValueError, match="needs image_ids"):
        evaluate_retrieval(scores=scores, text_to_image=text_to_image, protocol="eccv_caption")
    with pytest.raises(ValueError, match="COCO image ids"):
        evaluate_retrieval(scores=scores, text_to_image=text_to_image, image_ids=np.arange(len(images)),
                           text_ids=np.arange(len(text_ids)), protocol="eccv_caption")  # fmt: skip


def test_unranked_positives_count_in_r_by_hand():
    # one image, four captions ranked 0 > 1 > 2 > 3; positives {0, 2} plus one that is not ranked: R = 3
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    result = evaluate_retrieval(
        scores=scores, text_to_image=[0, 0, 0, 0], positives={"i2t": [[0, 2]]}, unranked_positives={"i2t": [1]}
    )
    assert result["i2t_r_precision"] == pytest.approx(100 * 2 / 3)
    assert result["i2t_map_at_r"] == pytest.approx(100 * (1 / 1 + 2 / 3) / 3)
    # t2i: unranked counts follow the caller's caption order even when captions are not grouped
    scores = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    result = evaluate_retrieval(
        scores=scores, text_to_image=[0, 1, 0], positives={"t2i": [[0], [1], [0]]},
        unranked_positives={"t2i": [0, 1, 0]},
    )  # fmt: skip
    assert result["t2i_r_precision"] == pytest.approx(100 * (1 + 0.5 + 1) / 3)


def test_evaluate_script_prints_the_pcmepp_table(tmp_path, capsys):
    """scripts/evaluate.py --protocol eccv_caption on a tiny COCO tree whose ids are real ECCV test ids."""
    import importlib.util

    from data_fixtures import CocoImage, write_coco_tree

    from hf_pcme import PCMEModel
    from hf_pcme.testing import tiny_pcme_config, tiny_processor

    original, eccv = load_positives("original"), load_positives("eccv")
    image_ids = sorted(eccv["i2t"])[:4]
    images = [
        CocoImage(i, "val2014", "test", [(c, f"a photo number {i} {n}", f"a photo number {i} {n}")
                                         for n, c in enumerate(original["i2t"][i])], [1 + i % 3])
        for i in image_ids
    ]  # fmt: skip
    for image_id, split in ((9, "train"), (25, "val")):  # the loader builds every split
        images.append(CocoImage(image_id, "train2014", split,
                                [(image_id * 10 + n, f"{split} caption {n}", f"{split} caption {n}") for n in range(5)], [1]))
    write_coco_tree(tmp_path / "coco", images)
    folder = tmp_path / "model"
    PCMEModel(tiny_pcme_config()).save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("evaluate_script", root / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    metrics = script.main(["--model", str(folder), "--dataset", "coco", "--data-dir", str(tmp_path / "coco"),
                           "--split", "test", "--protocol", "eccv_caption", "--output", str(tmp_path / "r.json"),
                           "--dataset-option", f"cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    out = capsys.readouterr().out
    assert "PCME++-style table (eccv_caption)" in out and "ECCV mAP@R" in out and "CxC R@1" in out
    assert {"eccv_i2t_map@r", "eccv_t2i_rp", "cxc_i2t_r@1"} <= set(metrics)
    assert 0 <= metrics["eccv_i2t_map@r"] <= 100
