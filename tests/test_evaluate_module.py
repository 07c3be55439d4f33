"""The `evaluate` module at metrics/pcme_retrieval loads offline and equals the library function."""

from pathlib import Path

import numpy as np
import pytest
import torch

evaluate = pytest.importorskip("evaluate")

from hf_pcme.metrics import evaluate_retrieval  # noqa: E402

MODULE_PATH = Path(__file__).resolve().parents[1] / "metrics" / "pcme_retrieval"


@pytest.fixture(scope="module")
def metric():
    return evaluate.load(str(MODULE_PATH))


def small_case():
    g = torch.Generator().manual_seed(0)
    text_to_image = torch.arange(6).repeat_interleave(3)[torch.randperm(18, generator=g)]
    scores = torch.randint(0, 4, (6, 18), generator=g).float()
    labels = (torch.rand(6, 5, generator=g) < 0.4).float()
    return text_to_image, scores, labels


def test_module_equals_library_on_scores(metric):
    text_to_image, scores, labels = small_case()
    kwargs = {"scores": scores, "image_labels": labels, "protocol": "coco", "fold_size": 2}
    result = metric.compute(text_to_image=text_to_image.tolist(), **kwargs)
    expected = evaluate_retrieval(text_to_image=text_to_image, **kwargs)
    assert result == expected
    assert {"1k/i2t_R@1", "1k/t2i_pmrp", "i2t_pmrp_zeta0", "rsum", "i2t_map_at_r"} <= set(result)


def test_module_accepts_numpy_and_embeddings(metric):
    g = torch.Generator().manual_seed(1)
    image_embeds, text_embeds = torch.randn(4, 8, generator=g), torch.randn(12, 8, generator=g)
    image_log_sigma2, text_log_sigma2 = torch.randn(4, 8, generator=g) - 3, torch.randn(12, 8, generator=g) - 3
    text_to_image = np.arange(12) % 4
    kwargs = {
        "image_embeds": image_embeds.numpy(), "text_embeds": text_embeds.numpy(),
        "image_log_sigma2": image_log_sigma2.numpy(), "text_log_sigma2": text_log_sigma2.numpy(), "scorer": "csd",
    }  # fmt: skip
    result = metric.compute(text_to_image=text_to_image, **kwargs)
    assert result == evaluate_retrieval(text_to_image=text_to_image, **kwargs)
    assert all(isinstance(v, float) for v in result.values())


def test_module_reports_bad_input(metric):
    with pytest.raises(ValueError, match="text_to_image"):
        metric.compute(text_to_image=[0, 1], scores=torch.rand(2, 3))
