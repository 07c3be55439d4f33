"""CONTRIBUTING.md's worked examples (the SigLIP loss, the Euclidean score) are the real files, match their formulas, and plug in by name."""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_pcme import ProbabilisticEmbedding
from hf_pcme.losses import LOSSES, build_loss
from hf_pcme.loss_siglip import SigmoidPairLoss
from hf_pcme.training.config import load_recipe

REPO_ROOT = Path(__file__).resolve().parent.parent


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_contributing_shows_the_real_loss_file():
    blocks = _python_blocks((REPO_ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8"))
    source = (REPO_ROOT / "src/hf_pcme/loss_siglip.py").read_text(encoding="utf-8")
    assert source in blocks


def test_siglip_registered_by_one_line():
    assert LOSSES["siglip"] is SigmoidPairLoss
    assert isinstance(build_loss("siglip", init_logit_bias=-3.0), SigmoidPairLoss)


def test_siglip_equals_bruteforce_loop_over_pairs():
    torch.manual_seed(0)
    image, text = torch.randn(3, 5), torch.randn(4, 5)
    positive = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    loss = SigmoidPairLoss(init_logit_scale=math.log(4.0), init_logit_bias=-1.5)
    got = loss(ProbabilisticEmbedding(mean=image), ProbabilisticEmbedding(mean=text), positive).loss

    expected = 0.0
    for i in range(3):
        for j in range(4):
            cosine = float(image[i] @ text[j]) / (float(image[i].norm()) * float(text[j].norm()))
            z = 1.0 if positive[i, j] else -1.0
            expected -= math.log(1.0 / (1.0 + math.exp(-z * (4.0 * cosine - 1.5))))
    assert float(got.detach()) == pytest.approx(expected / 3, rel=1e-5)


def test_siglip_gradient_reaches_its_own_parameters():
    loss = SigmoidPairLoss()
    image = ProbabilisticEmbedding(mean=F.normalize(torch.randn(2, 3), dim=-1))
    text = ProbabilisticEmbedding(mean=F.normalize(torch.randn(2, 3), dim=-1))
    loss(image, text).loss.backward()
    assert loss.logit_scale.grad is not None and loss.logit_bias.grad is not None


def test_recipe_accepts_a_registered_loss_without_other_edits():
    recipe = load_recipe(REPO_ROOT / "configs/shapes_deterministic.yaml", ["model.loss_type=siglip"])
    assert recipe.model.loss_type == "siglip"
    with pytest.raises(ValueError, match="model.loss_type.*siglip"):
        load_recipe(REPO_ROOT / "configs/shapes_deterministic.yaml", ["model.loss_type=sigclip"])


# ---- the worked example of a new score (Euclidean distance)
def test_contributing_shows_the_real_score_file():
    blocks = _python_blocks((REPO_ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8"))
    assert (REPO_ROOT / "src/hf_pcme/score_euclidean.py").read_text(encoding="utf-8") in blocks


def test_euclidean_registered_by_one_line_is_searchable_by_the_index():
    from hf_pcme.index import METRICS
    from hf_pcme.score_euclidean import EuclideanScore
    from hf_pcme.scoring import SCORES, SEARCH_SCORES, build_score

    assert SCORES["euclidean"] is EuclideanScore and isinstance(build_score("euclidean"), EuclideanScore)
    assert "euclidean" in SEARCH_SCORES and "euclidean" in METRICS


def _squared_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    return sum((float(a) - float(b)) ** 2 for a, b in zip(x, y))


def test_euclidean_equals_bruteforce_loop_over_pairs_and_best_of_k_pairs():
    from hf_pcme.score_euclidean import EuclideanScore

    generator = torch.Generator().manual_seed(0)
    image, text = torch.randn(3, 5, generator=generator), torch.randn(4, 5, generator=generator)
    got = EuclideanScore().pairwise(ProbabilisticEmbedding(mean=image, log_sigma2=torch.zeros(3, 5)), text)
    expected = torch.tensor([[-_squared_distance(image[i], text[j]) for j in range(4)] for i in range(3)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    image_k, text_k = torch.randn(2, 3, 5, generator=generator), torch.randn(4, 2, 5, generator=generator)
    got_k = EuclideanScore().pairwise(image_k, text_k)
    expected_k = torch.tensor([[max(-_squared_distance(image_k[i, k], text_k[j, l]) for k in range(3) for l in range(2))
                                for j in range(4)] for i in range(2)])
    torch.testing.assert_close(got_k, expected_k, rtol=1e-5, atol=1e-5)


def test_euclidean_search_vectors_give_the_score_and_keep_the_means():
    from hf_pcme.score_euclidean import EuclideanScore

    generator = torch.Generator().manual_seed(1)
    queries, items = torch.randn(3, 6, generator=generator), torch.randn(5, 6, generator=generator)
    score = EuclideanScore()
    query_vectors, offsets = score.query_vectors(queries)
    item_vectors = score.item_vectors(items)
    inner = torch.einsum("qd,nd->qn", query_vectors[:, 0], item_vectors[:, 0]) - offsets
    expected = torch.tensor([[-_squared_distance(queries[q], items[n]) for n in range(5)] for q in range(3)])
    torch.testing.assert_close(inner, expected, rtol=1e-5, atol=1e-5)
    left, right = score.pair_vectors(queries, None, "left"), score.pair_vectors(items, None, "right")
    torch.testing.assert_close(left[:, 0] @ right[:, 0].t(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(score.means_from_item_vectors(item_vectors)[:, 0], items)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_index_with_the_euclidean_score_finds_the_bruteforce_nearest_items(backend, tmp_path):
    from hf_pcme.index import CrossModalIndex

    generator = torch.Generator().manual_seed(2)
    items, queries = torch.randn(40, 8, generator=generator), torch.randn(4, 8, generator=generator)
    index = CrossModalIndex.from_embeddings(items, metric="euclidean", backend=backend)
    result = CrossModalIndex.load(index.save(tmp_path / "index")).search(queries, top_k=5)
    for q in range(4):
        distances = [_squared_distance(queries[q], items[n]) for n in range(40)]
        assert result.indices[q].tolist() == sorted(range(40), key=distances.__getitem__)[:5]
        torch.testing.assert_close(result.scores[q], -torch.tensor(sorted(distances)[:5]), rtol=1e-4, atol=1e-4)


def test_retrieval_metrics_rank_by_the_euclidean_score_without_a_scorer_line():
    from hf_pcme.metrics import SCORERS, evaluate_retrieval

    generator = torch.Generator().manual_seed(1)
    images, texts = torch.randn(6, 4, generator=generator), torch.randn(12, 4, generator=generator)
    text_to_image = torch.arange(12) // 2
    brute_force = torch.tensor([[-_squared_distance(images[i], texts[j]) for j in range(12)] for i in range(6)])
    got = evaluate_retrieval(image_embeds=images, text_embeds=texts, text_to_image=text_to_image, scorer="euclidean")
    expected = evaluate_retrieval(scores=brute_force, text_to_image=text_to_image)
    assert "euclidean" in SCORERS
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key]), key
