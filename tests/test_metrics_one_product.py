"""Metrics in one product (the held score matrix) vs two passes (one product per direction): same results."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_pcme.metrics import RetrievalOptions, build_scorer, definitions, evaluate_retrieval, ranking
from hf_pcme.metrics.schedule import ONE_PRODUCT, TWO_PASSES, score_path
from hf_pcme.metrics.scorers import CosineScorer

HUGE, NONE = 1 << 40, 0


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def ranking_path(request, monkeypatch):
    monkeypatch.setattr(ranking, "USE_KERNEL", request.param == "kernel")


def exact_embeddings(num_images: int, captions: int, seed: int):
    """Unit vectors of +-1/4 entries (D = 16): every cosine is a multiple of 1/16, exact in any summation
    order, so both paths must agree bit for bit whatever the BLAS, and there are many ties."""
    g = torch.Generator().manual_seed(seed)
    text_to_image = torch.arange(num_images).repeat_interleave(captions)
    text_to_image = text_to_image[torch.randperm(text_to_image.numel(), generator=g)]
    images = (torch.randint(0, 2, (num_images, 16), generator=g) * 2 - 1) / 4.0
    texts = (torch.randint(0, 2, (text_to_image.numel(), 16), generator=g) * 2 - 1) / 4.0
    labels = (torch.rand(num_images, 5, generator=g) < 0.4).float()
    return images, texts, text_to_image, labels


def random_embeddings(num_images: int, captions: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    text_to_image = torch.arange(num_images).repeat_interleave(captions)
    images = F.normalize(torch.randn(num_images, dim, generator=g), dim=-1)
    texts = F.normalize(images[text_to_image] + torch.randn(text_to_image.numel(), dim, generator=g), dim=-1)
    log_sigma2 = (
        torch.randn(num_images, dim, generator=g) - 3,
        torch.randn(text_to_image.numel(), dim, generator=g) - 3,
    )
    labels = (torch.rand(num_images, 8, generator=g) < 0.3).float()
    return images, texts, log_sigma2, text_to_image, labels


def both_paths(**kwargs):
    results, per_query = {}, {}
    for name, budget in (("one", HUGE), ("two", NONE)):
        per_query[name] = {}
        results[name] = evaluate_retrieval(**kwargs, max_memory=budget, per_query=per_query[name])
    return results, per_query


def assert_identical(results, per_query):
    assert results["one"] == results["two"]  # to the last digit
    assert set(per_query["one"]) == set(per_query["two"])
    for name, values in per_query["one"].items():
        np.testing.assert_array_equal(values, per_query["two"][name], err_msg=name)


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_both_paths_equal_bruteforce_with_ties(chunk_size):
    images, texts, text_to_image, labels = exact_embeddings(12, 3, seed=0)
    results, per_query = both_paths(image_embeds=images, text_embeds=texts, text_to_image=text_to_image,
                                    image_labels=labels, chunk_size=chunk_size, num_workers=2)  # fmt: skip
    assert_identical(results, per_query)
    expected = definitions.reference_metrics((images @ texts.t()).numpy(), text_to_image.numpy(), labels.numpy())
    for key, value in expected.items():
        assert results["one"][key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("scorer", ["cosine", "csd"])
def test_both_paths_identical_on_continuous_scores_with_folds(scorer):
    images, texts, (image_ls2, text_ls2), text_to_image, labels = random_embeddings(60, 5, 32, seed=1)
    order = torch.randperm(text_to_image.numel(), generator=torch.Generator().manual_seed(2))  # captions unsorted
    results, per_query = both_paths(
        image_embeds=images, text_embeds=texts[order], image_log_sigma2=image_ls2, text_log_sigma2=text_ls2[order],
        scorer=scorer, text_to_image=text_to_image[order], image_labels=labels, protocol="coco", fold_size=20,
    )  # fmt: skip
    assert_identical(results, per_query)
    assert "1k/i2t_R@1" in results["one"]


def test_both_paths_identical_with_classes_and_polysemous_embeddings():
    g = torch.Generator().manual_seed(4)
    images = F.normalize(torch.randn(20, 2, 16, generator=g), dim=-1)
    texts = F.normalize(torch.randn(40, 2, 16, generator=g), dim=-1)
    text_to_image = torch.arange(20).repeat_interleave(2)
    classes = torch.randint(-1, 4, (20,), generator=g)
    results, per_query = both_paths(image_embeds=images, text_embeds=texts, scorer="polysemous",
                                    text_to_image=text_to_image, image_classes=classes)  # fmt: skip
    assert_identical(results, per_query)


def test_the_budget_chooses_the_path(monkeypatch):
    images, texts, text_to_image, _ = exact_embeddings(10, 2, seed=5)
    matrix_bytes = 10 * 20 * 4
    source = build_scorer("cosine", image_embeds=images, text_embeds=texts)
    assert score_path(source, matrix_bytes) == ONE_PRODUCT
    assert score_path(source, matrix_bytes - 1) == TWO_PASSES
    caption_side_products = []
    original = CosineScorer.text_rows
    def counted(self, *args, **kwargs):
        caption_side_products.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CosineScorer, "text_rows", counted)
    evaluate_retrieval(image_embeds=images, text_embeds=texts, text_to_image=text_to_image, max_memory=matrix_bytes)
    assert caption_side_products == []  # one product: t2i ranked from the held matrix
    evaluate_retrieval(image_embeds=images, text_embeds=texts, text_to_image=text_to_image, max_memory=matrix_bytes - 1)
    assert caption_side_products  # two passes: the captions' rows computed from their side


def test_sampled_scorer_keeps_two_passes():
    # its image-side and caption-side blocks are different floating-point computations
    g = torch.Generator().manual_seed(6)
    source = build_scorer("sampled", image_samples=torch.randn(4, 3, 8, generator=g),
                          text_samples=torch.randn(8, 3, 8, generator=g), negative_scale=5.0, shift=1.0)  # fmt: skip
    assert score_path(source, HUGE) == TWO_PASSES


def test_options_object_equals_keywords_and_is_checked():
    images, texts, text_to_image, labels = exact_embeddings(10, 2, seed=7)
    common = {"image_embeds": images, "text_embeds": texts, "text_to_image": text_to_image, "image_labels": labels}
    keywords = evaluate_retrieval(**common, protocol="coco", fold_size=5, ks=(1, 2), zetas=(0, 1))
    options = RetrievalOptions(protocol="coco", fold_size=5, ks=(1, 2), zetas=(0, 1))
    assert evaluate_retrieval(**common, options=options) == keywords
    with pytest.raises(ValueError, match="either as options= or as keywords"):
        evaluate_retrieval(**common, options=options, fold_size=2)
    with pytest.raises(ValueError, match="max_memory"):
        evaluate_retrieval(**common, max_memory=-1)
