"""hf_pcme.scoring: each score against its formula (docs/formulas.md), and model / index / metrics agree through it."""

from __future__ import annotations

import math

import pytest
import torch

from hf_pcme.outputs import ProbabilisticEmbedding
from hf_pcme.scoring import (
    SCORES,
    SEARCH_SCORES,
    BestPairScore,
    CosineScore,
    CSDScore,
    SampledMatchScore,
    build_score,
    default_score,
    default_search_score,
)


def _gaussians(seed: int, n: int, dim: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator), 0.5 * torch.randn(n, dim, generator=generator) - 1.0


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(x @ y) / (math.sqrt(float(x @ x)) * math.sqrt(float(y @ y)))


def _csd(mu_x, log_x, mu_y, log_y) -> float:
    mu_x, mu_y = mu_x.double(), mu_y.double()
    return float(((mu_x - mu_y) ** 2).sum() + log_x.double().exp().sum() + log_y.double().exp().sum())


def test_cosine_score_is_the_cosine_of_every_pair():
    image, _ = _gaussians(0, 4)
    text, _ = _gaussians(1, 3)
    scores = CosineScore().pairwise(image, text)
    expected = torch.tensor([[_cos(image[i], text[j]) for j in range(3)] for i in range(4)])
    assert scores.shape == (4, 3)
    torch.testing.assert_close(scores.double(), expected.double(), rtol=0, atol=1e-6)


def test_best_pair_score_is_the_max_cosine_over_k_by_k_pairs():
    generator = torch.Generator().manual_seed(2)
    image, text = torch.randn(3, 2, 5, generator=generator), torch.randn(4, 3, 5, generator=generator)
    scores = BestPairScore().pairwise(image, text)
    expected = torch.tensor(
        [[max(_cos(image[i, k], text[j, l]) for k in range(2) for l in range(3)) for j in range(4)] for i in range(3)]
    )
    torch.testing.assert_close(scores.double(), expected.double(), rtol=0, atol=1e-6)


def test_csd_score_is_minus_the_closed_form_sampled_distance():
    mu_v, log_v = _gaussians(3, 4)
    mu_t, log_t = _gaussians(4, 3)
    image = ProbabilisticEmbedding(mean=mu_v, log_sigma2=log_v)
    scores = CSDScore().pairwise(image, ProbabilisticEmbedding(mean=mu_t, log_sigma2=log_t))
    expected = torch.tensor([[-_csd(mu_v[i], log_v[i], mu_t[j], log_t[j]) for j in range(3)] for i in range(4)])
    torch.testing.assert_close(scores.double(), expected.double(), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="log variances"):
        CSDScore().pairwise(mu_v, mu_t)


def test_sampled_score_is_the_log_mean_sigmoid_over_sample_pairs():
    generator = torch.Generator().manual_seed(5)
    image, text = torch.randn(3, 2, 4, generator=generator), torch.randn(2, 3, 4, generator=generator)
    a, b = 2.0, 1.5
    scores = SampledMatchScore(a, b).pairwise(
        ProbabilisticEmbedding(mean=image.mean(1), samples=image),
        ProbabilisticEmbedding(mean=text.mean(1), samples=text),
    )
    expected = torch.empty(3, 2, dtype=torch.float64)
    for i in range(3):
        for j in range(2):
            total = 0.0
            for x in image[i].double():
                for y in text[j].double():
                    distance = math.sqrt(float(((x - y) ** 2).sum()) + 1e-6)
                    total += 1.0 / (1.0 + math.exp(-2.0 * (-a * distance + b)))
            expected[i, j] = math.log(total / 6.0)
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=1e-5)


def test_csd_search_vectors_give_minus_csd_and_the_pair_vectors_derive_from_them():
    """One CSD encoding: item [2 mu, -c], query [mu, 1] - c; left = [item, 1], right = [query, -c]."""
    mu_v, log_v = _gaussians(6, 5)
    mu_t, log_t = _gaussians(7, 4)
    score = CSDScore()
    expected = torch.tensor([[-_csd(mu_v[i], log_v[i], mu_t[j], log_t[j]) for j in range(4)] for i in range(5)])
    # index path: query (images) against items (captions), D + 1 dims
    items = score.item_vectors(mu_t, log_t).squeeze(1)
    queries, offsets = score.query_vectors(mu_v, log_v)
    assert items.shape == (4, 6) and queries.shape == (5, 1, 6)
    index_path = queries.squeeze(1).double() @ items.double().t() - offsets.double()
    torch.testing.assert_close(index_path, expected.double(), rtol=1e-6, atol=1e-5)
    # metrics path: both directions from one pair of matrices, D + 2 dims, bit for bit the old layout
    left = score.pair_vectors(mu_v, log_v, "left").squeeze(1)
    right = score.pair_vectors(mu_t, log_t, "right").squeeze(1)
    c_v = mu_v.pow(2).sum(-1) + log_v.exp().sum(-1)
    c_t = mu_t.pow(2).sum(-1) + log_t.exp().sum(-1)
    assert torch.equal(left, torch.cat([2.0 * mu_v, -c_v[:, None], torch.ones(5, 1)], dim=1))
    assert torch.equal(right, torch.cat([mu_t, torch.ones(4, 1), -c_t[:, None]], dim=1))
    assert torch.equal(left[:, :-1], score.item_vectors(mu_v, log_v).squeeze(1))
    torch.testing.assert_close(left.double() @ right.double().t(), index_path, rtol=0, atol=1e-9)
    # the stored means come back exactly
    assert torch.equal(score.means_from_item_vectors(items), mu_t)


def test_cosine_search_vectors_are_unit_means_with_no_offset():
    mean, _ = _gaussians(8, 3)
    score = CosineScore()
    unit = mean / mean.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(score.item_vectors(mean).squeeze(1), unit)
    queries, offsets = score.query_vectors(mean)
    torch.testing.assert_close(queries.squeeze(1), unit)
    assert torch.equal(offsets, torch.zeros(3, 1))
    for side in ("left", "right"):
        assert torch.equal(score.pair_vectors(mean, None, side), score.item_vectors(mean))
    with pytest.raises(ValueError, match="side"):
        score.pair_vectors(mean, None, "query")
    with pytest.raises(ValueError, match="not an inner product"):
        SampledMatchScore(1.0, 0.0).item_vectors(mean)


class _Config:
    def __init__(self, head_type: str, match_function: str = "sampled") -> None:
        self.head_type, self.match_function = head_type, match_function


@pytest.mark.parametrize(
    ("head_type", "match_function", "score", "search_score"),
    [
        ("deterministic", "sampled", "cosine", "cosine"),
        ("polysemous", "sampled", "polysemous", "cosine"),
        ("diversified_attention", "csd", "polysemous", "cosine"),
        ("probabilistic", "csd", "csd", "csd"),
        ("probabilistic", "sampled", "sampled", "cosine"),
    ],
)
def test_default_score_of_each_head_and_the_old_names_agree(head_type, match_function, score, search_score):
    from hf_pcme.evaluation import default_scorer
    from hf_pcme.heads import MULTI_EMBEDDING_HEADS
    from hf_pcme.index import default_metric

    config = _Config(head_type, match_function)
    model = type("Model", (), {"config": config})()
    assert default_score(config) == default_scorer(model) == score
    assert default_search_score(config) == default_metric(model) == search_score
    assert search_score in SEARCH_SCORES
    assert set(MULTI_EMBEDDING_HEADS) == {"polysemous", "diversified_attention"}


def test_registries_of_index_and_metrics_are_the_scoring_registry():
    from hf_pcme.index import METRICS
    from hf_pcme.metrics import SCORERS

    assert {"cosine", "csd", "sampled", "polysemous"} <= set(SCORERS) <= set(SCORES)
    assert all(SCORERS[name].score is SCORES[name] for name in SCORERS)
    assert all(SCORES[name].name == name for name in SCORES)
    assert tuple(METRICS) == SEARCH_SCORES
    assert all(SCORES[name].searchable for name in SEARCH_SCORES)
    assert isinstance(build_score("sampled", negative_scale=1.0, shift=0.0), SampledMatchScore)
    with pytest.raises(ValueError, match="valid choices"):
        build_score("dot")
    with pytest.raises(ValueError, match="negative_scale"):
        build_score("sampled")


def test_model_index_and_metrics_rank_a_pair_the_same_way():
    """PCME++ (CSD): the model's log p, the index's scores and the metrics' blocks all order pairs by -CSD."""
    from hf_pcme.index import CrossModalIndex
    from hf_pcme.metrics import build_scorer
    from hf_pcme.modeling_pcme import PCMEModel
    from hf_pcme.testing import tiny_pcme_config

    torch.manual_seed(0)
    model = PCMEModel(tiny_pcme_config(match_function="csd")).eval()
    mu_v, log_v = _gaussians(9, 6, dim=8)
    mu_t, log_t = _gaussians(10, 5, dim=8)
    image = ProbabilisticEmbedding(mean=mu_v, log_sigma2=log_v)
    text = ProbabilisticEmbedding(mean=mu_t, log_sigma2=log_t)
    reference = CSDScore().pairwise(image, text)
    with torch.no_grad():
        logits = model.pairwise_logits(image, text)
    a, b = float(model.negative_scale.detach()), float(model.shift.detach())
    torch.testing.assert_close(logits, torch.nn.functional.logsigmoid(a * reference + b))
    metrics_block = build_scorer(
        "csd", image_embeds=mu_v, text_embeds=mu_t, image_log_sigma2=log_v, text_log_sigma2=log_t
    ).image_rows(slice(None))
    torch.testing.assert_close(metrics_block, reference, rtol=1e-5, atol=1e-4)
    index = CrossModalIndex.from_embeddings(mu_t, log_t, modality="text", metric=default_search_score(model.config))
    result = index.search(mu_v, log_v, top_k=5)
    torch.testing.assert_close(result.scores, reference.sort(dim=1, descending=True).values, rtol=1e-5, atol=1e-4)
    assert torch.equal(result.indices, reference.argsort(dim=1, descending=True))
