"""The cross-modal-retrieval pipeline: brute-force equality, hot swap, errors, heatmaps, remote code.

Expected rankings and probabilities are recomputed here from the model's embeddings with the
formulas of docs/formulas.md (CSD, cosine, PCME++ / PCME match probabilities).
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from hf_pcme import PCMEModel
from hf_pcme.index import CrossModalIndex
from hf_pcme.pipeline_cross_modal_retrieval import (
    TASK,
    CrossModalRetrievalPipeline,
    declare_pipeline,
    register_pipeline,
)
from hf_pcme.testing import tiny_pcme_config, tiny_processor
from hf_pcme.visualization import attention_grid, attention_heatmap, save_attention_heatmap

# Captions of equal length (no padding, so batch composition cannot change an embedding).
CAPTIONS = [
    f"a {size} {colour} {shape}"
    for size, colour, shape in itertools.product(("small", "large"), ("red", "green", "blue"), ("circle", "square"))
]


def noise_images(count: int, seed: int = 0, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_pipeline()


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(CAPTIONS)


def make_model(seed: int = 0, **config) -> PCMEModel:
    torch.manual_seed(seed)
    return PCMEModel(tiny_pcme_config(**config)).eval()


def make_retriever(model, processor, **kwargs) -> CrossModalRetrievalPipeline:
    return pipeline(TASK, model=model, processor=processor, device="cpu", progress_bar=False, **kwargs)


@pytest.fixture(scope="module")
def csd_model():
    return make_model(0, match_function="csd", loss_type="pcme++")


def embed(model, processor, *, images=None, texts=None):
    with torch.no_grad():
        if texts is not None:
            inputs = processor(text=texts)
            return model.get_text_features(inputs["input_ids"], inputs["attention_mask"], num_samples=0)
        return model.get_image_features(processor(images=images)["pixel_values"], num_samples=0)


def csd_by_hand(query, items) -> torch.Tensor:
    """d = ||mu_v - mu_t||^2 + sum sigma_v^2 + sum sigma_t^2 (float64)."""
    mu_q, mu_t = query.mean.double(), items.mean.double()
    squared = ((mu_q[:, None, :] - mu_t[None, :, :]) ** 2).sum(-1)
    return squared + query.log_sigma2.double().exp().sum(-1)[:, None] + items.log_sigma2.double().exp().sum(-1)[None, :]


def assert_clear_ranking(scores: torch.Tensor, top_k: int) -> None:
    """The test data must not have near-ties at the cut, or the comparison would test float noise."""
    ordered = scores.sort(dim=1, descending=True).values[:, : top_k + 1]
    assert (ordered[:, :-1] - ordered[:, 1:]).min() > 1e-5


# ---------------------------------------------------------------------------- registration
def test_import_registers_the_task():
    script = (
        "import hf_pcme\nfrom transformers.pipelines import PIPELINE_REGISTRY\n"
        "print(PIPELINE_REGISTRY.get_supported_tasks())"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert TASK in result.stdout


def test_pipeline_factory_builds_our_class(csd_model, processor):
    retriever = make_retriever(csd_model, processor)
    assert isinstance(retriever, CrossModalRetrievalPipeline)
    assert retriever.device == torch.device("cpu")


# ---------------------------------------------------------------------------- brute-force equality
def test_image_queries_match_bruteforce_csd_ranking(csd_model, processor):
    images = noise_images(3)
    retriever = make_retriever(csd_model, processor)
    outputs = retriever(images=images, corpus=CAPTIONS, top_k=4, metric="csd")

    query = embed(csd_model, processor, images=images)
    items = embed(csd_model, processor, texts=CAPTIONS)
    distances = csd_by_hand(query, items)
    assert_clear_ranking(-distances, 4)
    expected_distances, expected_ids = distances.topk(4, dim=1, largest=False)
    a, b = csd_model.negative_scale.item(), csd_model.shift.item()
    for q, output in enumerate(outputs):
        assert [r["id"] for r in output["results"]] == expected_ids[q].tolist()
        assert [r["text"] for r in output["results"]] == [CAPTIONS[i] for i in expected_ids[q].tolist()]
        for rank, result in enumerate(output["results"]):
            d = expected_distances[q, rank].item()
            assert result["distance"] == pytest.approx(d, rel=1e-5)
            assert result["score"] == pytest.approx(-d, rel=1e-5)
            # PCME++: p = sigmoid(-a d + b)
            assert result["match_probability"] == pytest.approx(1 / (1 + math.exp(a * d - b)), rel=1e-4, abs=1e-9)
            item = expected_ids[q, rank].item()
            assert result["uncertainty"] == pytest.approx(items.log_sigma2[item].exp().mean().item(), rel=1e-5)
        assert output["query_uncertainty"] == pytest.approx(query.log_sigma2[q].exp().mean().item(), rel=1e-5)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("head_type, loss_type", [("deterministic", "vsepp"), ("polysemous", "pvse")])
def test_text_queries_match_bruteforce_cosine_ranking(processor, backend, head_type, loss_type):
    pytest.importorskip("faiss") if backend == "faiss" else None
    model = make_model(1, head_type=head_type, loss_type=loss_type, num_embeds=2)
    corpus = noise_images(9, seed=1)
    retriever = make_retriever(model, processor)
    texts = CAPTIONS[:3]
    outputs = retriever(texts=texts, corpus=corpus, top_k=3, backend=backend)

    query = embed(model, processor, texts=texts).mean
    items = embed(model, processor, images=corpus).mean
    q = query if query.dim() == 3 else query.unsqueeze(1)
    t = items if items.dim() == 3 else items.unsqueeze(1)
    unit_q = q.double() / q.double().norm(dim=-1, keepdim=True)
    unit_t = t.double() / t.double().norm(dim=-1, keepdim=True)
    # best cosine over the K x K embedding pairs (K = 1 for the deterministic head)
    cosine = torch.einsum("qid,njd->qnij", unit_q, unit_t).amax(dim=(2, 3))
    assert_clear_ranking(cosine, 3)
    expected_scores, expected_ids = cosine.topk(3, dim=1)
    a, b = model.negative_scale.item(), model.shift.item()
    for row, output in enumerate(outputs):
        assert [r["id"] for r in output["results"]] == expected_ids[row].tolist()
        assert output["query_uncertainty"] is None
        for rank, result in enumerate(output["results"]):
            assert result["score"] == pytest.approx(expected_scores[row, rank].item(), rel=1e-5, abs=1e-6)
            assert "text" not in result and "distance" not in result and result["uncertainty"] is None
            # PCME's sampled probability with the K means as samples: mean over pairs of sigmoid(2(-a d + b))
            item = t[expected_ids[row, rank]].double()
            d = torch.sqrt(((q[row].double()[:, None] - item[None]) ** 2).sum(-1) + 1e-6)
            expected_p = torch.sigmoid(2 * (-a * d + b)).mean().item()
            assert result["match_probability"] == pytest.approx(expected_p, rel=1e-4, abs=1e-9)


def test_sampled_match_probability_is_reproducible_and_uses_samples(processor):
    model = make_model(2)  # PCME: probabilistic head, sampled match probability
    retriever = make_retriever(model, processor)
    first = retriever(texts=CAPTIONS[0], corpus=noise_images(4), top_k=4)
    again = retriever(texts=CAPTIONS[0], corpus=noise_images(4), top_k=4)
    other_seed = retriever(texts=CAPTIONS[0], corpus=noise_images(4), top_k=4, match_seed=1)
    probabilities = [r["match_probability"] for r in first["results"]]
    assert probabilities == [r["match_probability"] for r in again["results"]]
    assert probabilities != [r["match_probability"] for r in other_seed["results"]]
    assert all(0.0 <= p <= 1.0 for p in probabilities)


def test_prebuilt_index_gives_the_same_results_as_a_corpus_list(csd_model, processor):
    retriever = make_retriever(csd_model, processor)
    images = noise_images(2, seed=3)
    from_list = retriever(images=images, corpus=CAPTIONS, top_k=5)
    index = retriever.build_index(CAPTIONS, progress_bar=False)
    assert retriever(images=images, corpus=index, top_k=5) == from_list
    retriever.set_index(index)
    assert retriever(images=images, top_k=5) == from_list


def test_image_paths_work_as_queries_and_corpus(csd_model, processor, tmp_path):
    images = noise_images(4, seed=4)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    retriever = make_retriever(csd_model, processor)
    by_pil = retriever(texts=CAPTIONS[:2], corpus=images, top_k=4)
    by_path = retriever(texts=CAPTIONS[:2], corpus=paths, corpus_modality="image", top_k=4)
    assert [[r["id"] for r in o["results"]] for o in by_path] == [
        [paths[r["id"]] for r in o["results"]] for o in by_pil
    ]
    from_path_query = retriever(images=paths[0], corpus=CAPTIONS, top_k=3)
    from_pil_query = retriever(images=images[0], corpus=CAPTIONS, top_k=3)
    assert from_path_query == from_pil_query


# ---------------------------------------------------------------------------- hot swap
def test_set_index_swaps_corpus_without_reloading_the_model(csd_model, processor):
    retriever = make_retriever(csd_model, processor)
    first = retriever.build_index(CAPTIONS[:6], progress_bar=False)
    second = retriever.build_index(CAPTIONS[6:], progress_bar=False)
    model_before = retriever.model
    retriever.set_index(first)
    assert {r["text"] for r in retriever(images=noise_images(1)[0], top_k=6)["results"]} == set(CAPTIONS[:6])
    retriever.set_index(second)
    assert {r["text"] for r in retriever(images=noise_images(1)[0], top_k=6)["results"]} == set(CAPTIONS[6:])
    assert retriever.model is model_before


def test_swap_while_a_thread_queries_never_mixes_indexes(csd_model, processor):
    retriever = make_retriever(csd_model, processor)
    mean = embed(csd_model, processor, texts=CAPTIONS)
    fingerprint = retriever.build_index(CAPTIONS[:1], progress_bar=False).model_fingerprint
    indexes = {
        name: CrossModalIndex.from_embeddings(
            mean.mean[rows], mean.log_sigma2[rows], ids=[f"{name}-{i}" for i in range(6)],
            metric="csd", model_fingerprint=fingerprint,
        )
        for name, rows in (("old", slice(0, 6)), ("new", slice(6, 12)))
    }
    queries = noise_images(2, seed=5)
    expected = {}
    for name, index in indexes.items():
        retriever.set_index(index)
        expected[name] = retriever(images=queries, top_k=6, batch_size=1)  # two batches per call

    seen, errors, stop = [], [], threading.Event()

    def query_forever():
        try:
            while not stop.is_set():
                seen.append(retriever(images=queries, top_k=6, batch_size=1))
        except Exception as error:  # surfaced in the main thread
            errors.append(error)

    worker = threading.Thread(target=query_forever)
    worker.start()
    try:
        for swap in range(300):
            retriever.set_index(indexes["old" if swap % 2 else "new"])
            if len(seen) >= 40:
                break
            threading.Event().wait(0.001)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not errors, errors
    assert len(seen) >= 2
    for result in seen:
        assert result in (expected["old"], expected["new"])  # never half old, half new
    assert {("old" if r == expected["old"] else "new") for r in seen} == {"old", "new"}


# ---------------------------------------------------------------------------- bad input
def test_index_of_another_model_is_rejected(csd_model, processor):
    retriever = make_retriever(csd_model, processor)
    other = make_retriever(make_model(7, match_function="csd", loss_type="pcme++"), processor)
    foreign = other.build_index(CAPTIONS, progress_bar=False)
    with pytest.raises(ValueError, match="built by a different model"):
        retriever.set_index(foreign)
    with pytest.raises(ValueError, match="built by a different model"):
        retriever(texts="a small red circle", corpus=foreign)
    with pytest.raises(ValueError, match="holds 4-d embeddings but the model makes 8-d"):
        retriever.set_index(CrossModalIndex.from_embeddings(torch.randn(5, 4)))


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(images=noise_images(1), texts=["a red circle"], corpus=CAPTIONS), "either images= or texts=, not both"),
        (dict(corpus=CAPTIONS), "No query"),
        (dict(texts=["a red circle"], corpus=[]), "corpus is empty"),
        (dict(texts=["a red circle"], corpus=CAPTIONS[:3], top_k=4), "top_k=4 is larger than the corpus \\(3 items\\)"),
        (dict(texts=["a red circle", noise_images(1)[0]], corpus=CAPTIONS), "texts must be captions"),
        (dict(texts=["a red circle"], corpus=["a caption", noise_images(1)[0]]), "corpus mixes captions"),
        (dict(texts=["a red circle"]), "No corpus to search"),
        (dict(texts=["a red circle"], corpus=CAPTIONS, topk=3), "Unknown argument\\(s\\) topk"),
    ],
)
def test_bad_calls_raise_clear_errors(csd_model, processor, call, message):
    retriever = make_retriever(csd_model, processor)
    with pytest.raises(ValueError, match=message):
        retriever(**call)


# ---------------------------------------------------------------------------- attention
def test_image_queries_return_attention_and_heatmap(csd_model, processor):
    image = noise_images(1, seed=6)[0]
    retriever = make_retriever(csd_model, processor)
    output = retriever(images=image, corpus=CAPTIONS, top_k=2, return_attention=True)
    attention = output["attention"]
    expected = embed(csd_model, processor, images=[image]).attention[0]
    assert attention.shape == (1, 16)  # one head over the 4 x 4 grid of the tiny ResNet
    np.testing.assert_allclose(attention, expected.numpy(), rtol=1e-5)
    assert output["attention_heatmap"].size == image.size
    assert "attention" not in retriever(images=image, corpus=CAPTIONS, top_k=2)


def test_caption_queries_return_their_token_attention(csd_model, processor):
    retriever = make_retriever(csd_model, processor)
    output = retriever(texts=CAPTIONS[1], corpus=noise_images(2), top_k=1, return_attention=True)
    expected = embed(csd_model, processor, texts=[CAPTIONS[1]]).attention[0]
    assert output["attention"].shape == (1, 4)  # one head over the 4 words
    np.testing.assert_allclose(output["attention"], expected.numpy(), rtol=1e-5)
    assert "attention_heatmap" not in output


def test_image_items_carry_their_attention(csd_model, processor):
    corpus = noise_images(3, seed=7)
    retriever = make_retriever(csd_model, processor)
    output = retriever(texts=CAPTIONS[0], corpus=corpus, top_k=3, return_attention=True)
    expected = embed(csd_model, processor, images=corpus).attention
    for result in output["results"]:
        np.testing.assert_allclose(result["attention"], expected[result["id"]].numpy(), rtol=1e-5)


def test_attention_grid_layouts():
    weights = torch.arange(16.0)
    assert attention_grid(weights)[1, 2] == 6.0  # row-major 4 x 4
    assert attention_grid(torch.cat([torch.tensor([99.0]), weights]))[0, 0] == 0.0  # leading CLS token dropped
    assert attention_grid(torch.arange(6.0), grid_size=(2, 3))[1, 0] == 3.0
    assert attention_grid(torch.stack([weights, 3 * weights]))[0, 1] == 2.0  # mean of the K maps
    with pytest.raises(ValueError, match="square grid"):
        attention_grid(torch.arange(6.0))


def test_heatmap_is_hottest_where_attention_peaks(tmp_path):
    attention = torch.zeros(16)
    attention[3] = 1.0  # row 0, column 3 of a 4 x 4 grid: the top-right corner
    heatmap = attention_heatmap(Image.new("RGB", (64, 64), "white"), attention, alpha=1.0)
    pixels = np.asarray(heatmap).astype(int)
    redness = pixels[..., 0] - pixels[..., 2]
    row, column = np.unravel_index(redness.argmax(), redness.shape)
    assert row < 16 and column >= 48
    assert tuple(pixels[60, 4]) == (0, 0, 128)  # no attention: jet(0) = dark blue
    path = save_attention_heatmap(Image.new("RGB", (8, 8)), attention, tmp_path / "heat.png")
    assert Image.open(path).format == "PNG"


# ---------------------------------------------------------------------------- saved / remote
@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory, csd_model, processor):
    folder = tmp_path_factory.mktemp("retriever")
    declare_pipeline(csd_model.config, folder)
    csd_model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del csd_model.config.custom_pipelines  # leave the shared fixture as it was
    return folder


def test_pipeline_loads_from_a_saved_folder(saved_folder, csd_model, processor):
    retriever = pipeline(TASK, model=str(saved_folder), device="cpu", progress_bar=False, trust_remote_code=True)
    expected = make_retriever(csd_model, processor)(texts="a large blue circle", corpus=noise_images(3), top_k=2)
    assert retriever(texts="a large blue circle", corpus=noise_images(3), top_k=2) == expected


def test_installed_package_serves_a_saved_folder_without_remote_code(saved_folder):
    # hf_pcme is imported here, so its registered class must serve the task; the folder's
    # custom_pipelines declaration is for environments without the package.
    retriever = pipeline(TASK, model=str(saved_folder), device="cpu", progress_bar=False)
    assert type(retriever) is CrossModalRetrievalPipeline


def test_remote_code_pipeline_works_without_the_package(saved_folder, csd_model, processor):
    images_path = saved_folder.parent / "query.png"
    noise_images(1, seed=8)[0].save(images_path)
    expected = make_retriever(csd_model, processor)(images=str(images_path), corpus=CAPTIONS, top_k=3)
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["hf_pcme"] = None  # only the folder's code may be used
        from transformers import pipeline
        retriever = pipeline({TASK!r}, model={str(saved_folder)!r}, trust_remote_code=True, device="cpu")
        assert type(retriever).__module__.startswith("transformers_modules"), type(retriever).__module__
        out = retriever(images={str(images_path)!r}, corpus={CAPTIONS!r}, top_k=3, progress_bar=False)
        print(json.dumps(out))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(saved_folder.parent / "modules"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["id"] for r in remote["results"]] == [r["id"] for r in expected["results"]]
    for got, want in zip(remote["results"], expected["results"]):
        assert got["score"] == pytest.approx(want["score"], rel=1e-6)
        assert got["match_probability"] == pytest.approx(want["match_probability"], rel=1e-6)
