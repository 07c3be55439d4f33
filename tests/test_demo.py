"""The demo's backend and rendering without a browser: rankings, errors, analysis, hot swap.

Expected rankings are recomputed here from the model's embeddings (CSD by hand); the analysis
sentence is checked against reports written here.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
CAPTIONS = [
    f"a {size} {colour} {shape}"
    for size, colour, shape in itertools.product(("small", "large"), ("red", "green", "blue"), ("circle", "square"))
]


def load_module(name: str):
    path = REPO_ROOT / "demo" / f"{name}.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


backend_module = load_module("demo_backend")
DemoBackend, DemoInputError = backend_module.DemoBackend, backend_module.DemoInputError


def noise_images(count: int, seed: int = 0, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def model_and_processor():
    from hf_pcme import PCMEModel
    from hf_pcme.testing import tiny_pcme_config, tiny_processor

    torch.manual_seed(0)
    return PCMEModel(tiny_pcme_config(match_function="csd", loss_type="pcme++")).eval(), tiny_processor(CAPTIONS)


@pytest.fixture(scope="module")
def backend(model_and_processor):
    return DemoBackend(model_and_processor, noise_images(10), gallery_captions=CAPTIONS, progress_bar=False)


@pytest.fixture(scope="module")
def demo_app():
    pytest.importorskip("gradio")
    return load_module("app")


def csd(query, items) -> torch.Tensor:
    """d = ||mu_q - mu_i||^2 + sum sigma_q^2 + sum sigma_i^2, shape (N,) for one query."""
    return ((query.mean[0] - items.mean) ** 2).sum(-1) + query.log_sigma2[0].exp().sum() + items.log_sigma2.exp().sum(-1)


def test_caption_query_ranks_images_by_csd(backend, model_and_processor):
    model, processor = model_and_processor
    answer = backend.query_text("  a large red square ", top_k=4)
    with torch.no_grad():
        query = model.get_text_features(**processor(text=["a large red square"]), num_samples=0)
        images = model.get_image_features(processor(images=noise_images(10))["pixel_values"], num_samples=0)
    distance = csd(query, images)
    assert [item.id for item in answer.results] == distance.argsort()[:4].tolist()
    assert [item.rank for item in answer.results] == [1, 2, 3, 4]
    for item in answer.results:
        assert item.score == pytest.approx(-distance[item.id].item(), rel=1e-5)
        assert item.uncertainty == pytest.approx(images.log_sigma2[item.id].exp().mean().item(), rel=1e-5)
        # percentile: share of the gallery's images with a smaller sigma^2
        share = (images.log_sigma2.exp().mean(-1) < images.log_sigma2[item.id].exp().mean() * (1 - 1e-6)).float().mean()
        assert item.uncertainty_percentile == pytest.approx(100 * share.item(), abs=1e-4)
        assert item.image is backend.gallery.images[item.id]
    assert answer.query_uncertainty == pytest.approx(query.log_sigma2[0].exp().mean().item(), rel=1e-5)
    assert [token for token, _ in answer.word_attention] == ["a", "large", "red", "square"]
    assert sum(weight for _, weight in answer.word_attention) == pytest.approx(1.0, abs=1e-5)


def test_image_query_ranks_captions_and_draws_attention(backend, model_and_processor):
    model, processor = model_and_processor
    image = noise_images(1, seed=5)[0]
    answer = backend.query_image(image, top_k=3)
    with torch.no_grad():
        query = model.get_image_features(processor(images=[image])["pixel_values"], num_samples=0)
        captions = model.get_text_features(**processor(text=CAPTIONS, padding=True), num_samples=0)
    expected = [CAPTIONS[i] for i in csd(query, captions).argsort()[:3].tolist()]
    assert answer.result_modality == "text"
    assert [item.text for item in answer.results] == expected
    assert answer.attention_heatmap is not None and answer.attention_heatmap.size == image.size


def test_bad_inputs_get_clear_messages(backend, tmp_path):
    with pytest.raises(DemoInputError, match="caption is empty"):
        backend.query_text("   ")
    with pytest.raises(DemoInputError, match="vocabulary"):
        backend.query_text("zebra xylophone")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    with pytest.raises(DemoInputError, match="'notes.txt' is not an image"):
        backend.query_image(text_file)
    with pytest.raises(DemoInputError, match="upload an image"):
        backend.query_image(None)
    with pytest.raises(DemoInputError, match="Not images.*notes.txt"):
        backend.load_gallery([text_file])


def test_model_folder_that_is_not_pcme_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        backend_module.check_model_dir(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        backend_module.check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' model, not a PCME model"):
        backend_module.check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "pcme"}))
    assert backend_module.check_model_dir(tmp_path) == tmp_path


def test_gallery_swap_keeps_the_model_and_changes_the_results(backend):
    startup = backend.gallery
    folder_gallery = backend.load_gallery(noise_images(3, seed=9))
    try:
        backend.set_gallery(folder_gallery)
        answer = backend.query_text("a small red circle", top_k=10)
        assert len(answer.results) == 3  # top_k capped at the gallery size
        assert backend.retriever.index is folder_gallery.image_index
        answer = backend.query_image(noise_images(1)[0], top_k=2)
        assert answer.result_modality == "image"  # no captions: similar images
        # a query that names its gallery does not depend on the default one
        assert len(backend.query_text("a small red circle", top_k=10, gallery=startup).results) == 10
    finally:
        backend.set_gallery(startup)


def test_folder_gallery_reads_images_and_captions(backend, tmp_path):
    for i, image in enumerate(noise_images(4, seed=3)):
        image.save(tmp_path / f"{i}.png")
    (tmp_path / "captions.txt").write_text("a red circle\n\na blue square\na red circle\n")
    gallery = backend.load_gallery(tmp_path)
    assert len(gallery) == 4 and gallery.captions == ["a red circle", "a blue square"]
    with pytest.raises(ValueError, match="neither 'shapes' nor a folder"):
        backend.load_gallery(tmp_path / "nothing")


def test_analysis_from_main_job_results_and_its_sentence(tmp_path):
    model_dir = tmp_path / "pcme"
    model_dir.mkdir()
    assert backend_module.load_uncertainty_analysis(model_dir) is None
    levels = [{"level": 0, "description": "exact", "mean_sigma2": 0.008},
              {"level": 4, "description": "some shapes", "mean_sigma2": 0.005}]
    report = {"uncertainty_vs_vagueness": {"pcme": {"spearman_rho": -0.95, "levels": levels}}}
    (tmp_path / "results.json").write_text(json.dumps(report))
    analysis = backend_module.load_uncertainty_analysis(model_dir)
    assert analysis.spearman_rho == -0.95 and len(analysis.levels) == 2
    sentence = backend_module.explain_uncertainty(0.0052, "text", 20.0, analysis)
    assert "lower σ² went with vaguer captions" in sentence and "-0.95" in sentence
    assert "'some shapes'" in sentence and "higher than 20%" in sentence and "not a promise" in sentence
    positive = backend_module.UncertaintyAnalysis(spearman_rho=0.6)
    assert "higher σ² went with vaguer" in backend_module.explain_uncertainty(0.01, "text", None, positive)
    assert "captions only" in backend_module.explain_uncertainty(0.01, "image", None, positive)
    assert "No uncertainty analysis" in backend_module.explain_uncertainty(0.01, "text", None, None)
    assert "point embeddings" in backend_module.explain_uncertainty(None, "text", None, None)
    # a report in the model folder wins over the main job's results
    (model_dir / "uncertainty_report.json").write_text(json.dumps({"spearman": {"rho": 0.4, "p": 0.01}}))
    assert backend_module.load_uncertainty_analysis(model_dir).spearman_rho == 0.4


def test_analysis_plots_order(tmp_path):
    for name in ("zeta.png", "calibration_reliability.png", "uncertainty_vs_vagueness.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in backend_module.analysis_plots(tmp_path)] == [
        "uncertainty_vs_vagueness.png", "calibration_reliability.png", "zeta.png"
    ]


def test_rendered_html_lists_results_best_first(backend, demo_app):
    app = demo_app
    answer = backend.query_text("a small blue circle", top_k=5)
    html = app.render_results(answer)
    assert html.count('class="pcme-card pcme-result"') == 5
    ranks = [html.index(f'data-rank="{rank}"') for rank in range(1, 6)]
    assert ranks == sorted(ranks)
    assert html.count('class="pcme-ubar"') == 5
    error = app.render_error(DemoInputError("The caption is empty <b>"))
    assert "pcme-error" in error and "&lt;b&gt;" in error  # escaped, not injected
