"""scripts/evaluate.py: a saved model + a dataset split -> metrics table, JSON, model-card model-index."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hf_pcme import PCMEModel
from hf_pcme.data import load_dataset_by_name, make_retrieval_split
from hf_pcme.testing import tiny_pcme_config, tiny_processor

REPO = Path(__file__).resolve().parent.parent
SHAPES_OPTIONS = {"num_images": 8, "num_eval_images": 12, "image_size": 32}


def _load_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    PCMEModel(tiny_pcme_config()).save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# tiny\n\nSome text.\n")
    return folder


def _brute_force_i2t_recall_at_1(folder, cache_dir):
    model = PCMEModel.from_pretrained(folder).eval()
    processor = tiny_processor()
    view = make_retrieval_split(load_dataset_by_name("shapes", split="test", cache_dir=cache_dir, **SHAPES_OPTIONS))
    with torch.no_grad():
        images = model.get_image_features(
            processor(images=[row["image"] for row in view.images], return_tensors="pt")["pixel_values"], num_samples=0
        ).mean
        texts = model.get_text_features(**processor(text=list(view.captions["caption"])), num_samples=0).mean
    cosine = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).t()
    hits = 0
    for i in range(view.num_images):
        best = int(torch.argmax(cosine[i]))
        # pessimistic ties: a hit only if no non-matching caption scores as high as the best match
        own = np.flatnonzero(view.text_to_image == i)
        best_own = float(cosine[i, own].max())
        others = [j for j in range(view.num_captions) if view.text_to_image[j] != i]
        hits += all(float(cosine[i, j]) < best_own for j in others)
        assert best >= 0
    return 100.0 * hits / view.num_images


def test_metrics_json_and_model_card(saved_model, tmp_path):
    script = _load_script()
    cache_dir = tmp_path / "cache"
    output = tmp_path / "results.json"
    options = [f"--dataset-option={key}={value}" for key, value in {**SHAPES_OPTIONS, "cache_dir": cache_dir}.items()]
    metrics = script.main(["--model", str(saved_model), "--dataset", "shapes", "--split", "test", "--scorer", "cosine",
                           "--output", str(output), "--update-card", *options])
    written = json.loads(output.read_text())
    assert written["metrics"] == metrics and written["scorer"] == "cosine"
    assert metrics["i2t_R@1"] == pytest.approx(_brute_force_i2t_recall_at_1(saved_model, cache_dir))
    card = (saved_model / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    results = front_matter["model-index"][0]["results"]
    reported = {m["type"]: m["value"] for r in results for m in r["metrics"]}
    assert reported["i2t_R@1"] == pytest.approx(round(metrics["i2t_R@1"], 4))
    assert front_matter["license"] == "apache-2.0" and "Some text." in card  # the rest of the card is kept


def test_bad_dataset_option_is_a_clear_error(saved_model):
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _load_script().main(["--model", str(saved_model), "--dataset", "shapes", "--dataset-option", "oops"])
