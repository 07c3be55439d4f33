"""hf_pcme.sampled_match: PCME's sampled match probability for ranking, against brute force and today's path."""

from __future__ import annotations

import math

import pytest
import torch

import hf_pcme.sampled_match as sampled_match
from hf_pcme.distances import pairwise_csd, pairwise_sampled_match_log_prob
from hf_pcme.metrics import evaluate_retrieval
from hf_pcme.metrics.scorers import SampledMatchScorer
from hf_pcme.sampled_match import sampled_match_log_prob
from hf_pcme.scoring import SampledMatchScore

# Tolerance of float32 results against float64 ones: the distances come from
# ||x||^2 + ||y||^2 - 2 x.y in float32, which loses up to ~D * 6e-8 * (||x||^2 + ||y||^2) in the
# squared distance, i.e. ~1e-5 in a distance of 0.5 at D = 32 and norms ~1, times 2a in the logit.
# The bound below is that times a margin of ~4 for a = 5; both float32 paths (today's and this one)
# stay inside it against float64.
FLOAT32_ATOL = 1e-4
FLOAT32_RTOL = 1e-5


def brute_force_log_p(samples_x, samples_y, a: float, b: float) -> torch.Tensor:
    """log p of every pair by a loop over the J x J' sample pairs, in Python floats (float64)."""
    x = samples_x.double().tolist()
    y = samples_y.double().tolist()
    result = torch.empty(len(x), len(y), dtype=torch.float64)
    for i, queries in enumerate(x):
        for k, items in enumerate(y):
            p, not_p, log_terms = 0.0, 0.0, []
            for zx in queries:
                for zy in items:
                    distance = math.sqrt(sum((u - v) ** 2 for u, v in zip(zx, zy)) + 1e-6)
                    logit = 2.0 * (b - a * distance)
                    p += 1.0 / (1.0 + math.exp(-logit)) if logit > -700 else 0.0
                    not_p += 1.0 / (1.0 + math.exp(logit)) if logit < 700 else 0.0
                    log_terms.append(-math.log1p(math.exp(-logit)) if logit > -30 else logit - math.log1p(math.exp(logit)))
            count = len(queries) * len(items)
            if p / count > 0.5:
                result[i, k] = math.log1p(-not_p / count)  # accurate when p is close to 1
            elif p / count > 1e-200:
                result[i, k] = math.log(p / count)
            else:  # log-mean-exp of log sigmoid, for p beyond float64's range
                top = max(log_terms)
                result[i, k] = top + math.log(sum(math.exp(t - top) for t in log_terms) / count)
    return result


def gaussian_samples(num_items: int, num_samples: int, dim: int, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    means = torch.nn.functional.normalize(torch.randn(num_items, dim, generator=g), dim=-1)
    return means.unsqueeze(1) + spread * torch.randn(num_items, num_samples, dim, generator=g)


def assert_close_float32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), atol=FLOAT32_ATOL, rtol=FLOAT32_RTOL)


def test_float64_equals_a_brute_force_loop_over_sample_pairs():
    samples_x = gaussian_samples(5, 3, 8, 0.3, seed=0).double()
    samples_y = gaussian_samples(7, 4, 8, 0.3, seed=1).double()
    expected = brute_force_log_p(samples_x, samples_y, 5.0, 5.0)
    got = sampled_match_log_prob(samples_x, samples_y, 5.0, 5.0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-11, rtol=1e-11)


def test_float32_equals_brute_force_and_todays_path_within_round_off():
    samples_x = gaussian_samples(9, 7, 32, 0.2, seed=2)
    samples_y = gaussian_samples(13, 7, 32, 0.2, seed=3)
    expected = brute_force_log_p(samples_x, samples_y, 5.0, 5.0)
    todays = pairwise_sampled_match_log_prob(samples_x, samples_y, 5.0, 5.0)[0]
    got = sampled_match_log_prob(samples_x, samples_y, 5.0, 5.0)
    assert got.dtype == torch.float32
    assert_close_float32(todays, expected)  # the tolerance holds for today's path too
    assert_close_float32(got, expected)
    assert_close_float32(got, todays)


@pytest.mark.parametrize("max_memory", [1, 4 * 7 * 7 * 3, 4 * 7 * 7 * 40, None])
def test_tiles_of_any_size_give_the_same_scores(max_memory):
    # 1 byte: one query x one item per tile; 3 and 40 items: ragged last tiles; None: one tile
    samples_x = gaussian_samples(11, 7, 16, 0.2, seed=4)
    samples_y = gaussian_samples(50, 7, 16, 0.2, seed=5)
    expected = brute_force_log_p(samples_x, samples_y, 5.0, 5.0)
    assert_close_float32(sampled_match_log_prob(samples_x, samples_y, 5.0, 5.0, max_memory=max_memory), expected)


def test_near_certain_matches_keep_their_relative_accuracy():
    # b >> a d: p within ~1e-8 of 1, log p ~ -1e-8; a float32 sum of sigmoids would round it to 0
    samples_x = gaussian_samples(4, 3, 8, 0.01, seed=6)
    samples_y = samples_x[[0, 1, 2, 3, 0]] + 0.001
    expected = brute_force_log_p(samples_x, samples_y, 1.0, 10.5)
    got = sampled_match_log_prob(samples_x, samples_y, 1.0, 10.5)
    assert bool((expected.abs() < 1e-7).all()) and bool((expected < 0).all())
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=0.0)


def test_vanishing_probabilities_stay_finite_and_exact():
    # a d up to ~60: p down to ~exp(-120), below float32's smallest number (~exp(-103)); the log-space
    # formula of today's path keeps it
    samples_x = gaussian_samples(3, 2, 8, 0.01, seed=7)
    samples_y = -samples_x[[0, 1, 2, 0]]
    expected = brute_force_log_p(samples_x, samples_y, 30.0, 0.0)
    got = sampled_match_log_prob(samples_x, samples_y, 30.0, 0.0)
    assert bool((expected < -60).all()) and bool((expected < -110).any())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0.0)


def test_pairs_recomputed_one_by_one_or_by_whole_rows_agree(monkeypatch):
    # one pair per row near p = 1 (the matching item), the others ordinary
    samples_x = gaussian_samples(6, 3, 8, 0.02, seed=8)
    samples_y = torch.cat([samples_x + 0.001, gaussian_samples(44, 3, 8, 0.02, seed=9)])
    expected = brute_force_log_p(samples_x, samples_y, 4.0, 2.0)
    assert int((expected > math.log(0.5)).sum()) == 6  # the 6 matching pairs take the exact path
    one_by_one = sampled_match_log_prob(samples_x, samples_y, 4.0, 2.0)
    monkeypatch.setattr(sampled_match, "WHOLE_ROW_RECOMPUTE_FRACTION", 0.0)
    whole_rows = sampled_match_log_prob(samples_x, samples_y, 4.0, 2.0)
    for got in (one_by_one, whole_rows):
        torch.testing.assert_close(got.double(), expected, atol=FLOAT32_ATOL, rtol=1e-4)


def test_half_precision_and_autocast_compute_in_float32():
    samples_x = gaussian_samples(5, 3, 16, 0.2, seed=10).bfloat16()
    samples_y = gaussian_samples(8, 3, 16, 0.2, seed=11).bfloat16()
    expected = brute_force_log_p(samples_x.float(), samples_y.float(), 5.0, 5.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sampled_match_log_prob(samples_x, samples_y, torch.tensor([5.0]), torch.tensor(5.0))
    assert got.dtype == torch.float32
    assert_close_float32(got, expected)


def test_out_buffer_is_filled_and_returned():
    samples_x = gaussian_samples(4, 2, 8, 0.2, seed=12)
    samples_y = gaussian_samples(6, 2, 8, 0.2, seed=13)
    out = torch.full((4, 6), float("nan"))
    got = sampled_match_log_prob(samples_x, samples_y, 5.0, 5.0, out=out)
    assert got is out
    assert_close_float32(out, brute_force_log_p(samples_x, samples_y, 5.0, 5.0))


class TodaysSampledScorer(SampledMatchScorer):
    """The scorer as it was: blocks from SampledMatchScore.pairwise (hf_pcme.distances)."""

    def _log_prob(self, queries, items, out=None):
        with torch.no_grad():
            return SampledMatchScore(self.negative_scale, self.shift).pairwise(queries, items)


def test_evaluate_retrieval_metrics_are_those_of_todays_scorer(monkeypatch):
    samples_i = gaussian_samples(20, 7, 16, 0.15, seed=14)
    samples_t = torch.cat([samples_i, samples_i]) + 0.15 * torch.randn(40, 7, 16, generator=torch.Generator().manual_seed(15))
    text_to_image = torch.arange(20).repeat(2)
    labels = (torch.rand(20, 5, generator=torch.Generator().manual_seed(16)) < 0.4).float()
    kwargs = dict(
        image_samples=samples_i, text_samples=samples_t, text_to_image=text_to_image, scorer="sampled",
        negative_scale=5.0, shift=5.0, image_labels=labels, chunk_size=7,
    )  # fmt: skip
    new = evaluate_retrieval(**kwargs)
    scores = brute_force_log_p(samples_i, samples_t, 5.0, 5.0)
    by_brute_force = evaluate_retrieval(
        scores=scores, text_to_image=text_to_image, image_labels=labels, chunk_size=7
    )
    monkeypatch.setattr(SampledMatchScorer, "_log_prob", TodaysSampledScorer._log_prob)
    todays = evaluate_retrieval(**kwargs)
    assert new == todays == by_brute_force


def test_scorer_blocks_equal_todays_blocks_both_directions():
    g = torch.Generator().manual_seed(17)
    inputs = dict(
        image_embeds=torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1),
        text_embeds=torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=-1),
        image_log_sigma2=torch.randn(6, 16, generator=g) * 0.3 - 4.0,
        text_log_sigma2=torch.randn(12, 16, generator=g) * 0.3 - 4.0,
        num_samples=5, negative_scale=torch.tensor([5.0]), shift=torch.tensor([5.0]), seed=3,
    )  # fmt: skip
    scorer, todays = SampledMatchScorer(**inputs, max_memory=1024), TodaysSampledScorer(**inputs)
    out = torch.empty(4, 12)
    assert scorer.image_rows(slice(1, 5), out=out) is out
    assert_close_float32(out, todays.image_rows(slice(1, 5)))
    assert_close_float32(scorer.text_rows(slice(0, 12)), todays.text_rows(slice(0, 12)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(samples_x=torch.zeros(3, 8)), "samples_x must be 3-D"),
        (dict(samples_y=torch.zeros(4, 2, 7)), "same embedding size"),
        (dict(samples_y=torch.zeros(0, 2, 8)), "samples_y needs at least one item"),
        (dict(samples_x=torch.zeros(3, 2, 8, dtype=torch.int64)), "samples_x must be a floating point"),
        (dict(samples_x=[[[0.0]]]), "samples_x must be a torch.Tensor"),
        (dict(negative_scale=torch.ones(2)), "negative_scale must be a scalar"),
        (dict(shift=float("nan")), "shift must be finite"),
        (dict(max_memory=0), "max_memory must be a positive"),
        (dict(out=torch.zeros(4, 3)), r"out must be a \(3, 4\) torch.float32 tensor"),
        (dict(out=torch.zeros(3, 4, dtype=torch.float64)), "out must be a"),
        (dict(out=torch.zeros(4, 3).t()), "out must have contiguous rows"),
    ],
)
def test_bad_input_raises_a_value_error_naming_it(change, message):
    arguments = dict(samples_x=torch.zeros(3, 2, 8), samples_y=torch.zeros(4, 2, 8), negative_scale=1.0, shift=0.0)
    arguments.update(change)
    keywords = {key: arguments.pop(key) for key in ("max_memory", "out") if key in arguments}
    with pytest.raises(ValueError, match=message):
        sampled_match_log_prob(*arguments.values(), **keywords)


def test_scorer_rejects_a_bad_max_memory():
    samples = torch.zeros(2, 2, 4)
    with pytest.raises(ValueError, match="max_memory must be a positive"):
        SampledMatchScorer(image_samples=samples, text_samples=samples, negative_scale=1.0, shift=0.0, max_memory=-5)


def test_rerank_top_k_rescored_items_get_log_p_and_the_rest_keep_candidate_order_below():
    samples_x = gaussian_samples(4, 3, 8, 0.2, seed=18)
    samples_y = gaussian_samples(12, 3, 8, 0.2, seed=19)
    candidates = torch.randn(4, 12, generator=torch.Generator().manual_seed(20))
    exact = brute_force_log_p(samples_x, samples_y, 5.0, 5.0)
    reranked = sampled_match.rerank_top_k(candidates, samples_x, samples_y, 5.0, 5.0, 3)
    for query in range(4):
        order = candidates[query].argsort(descending=True).tolist()
        top, rest = order[:3], order[3:]
        torch.testing.assert_close(reranked[query, top].double(), exact[query, top], atol=FLOAT32_ATOL, rtol=FLOAT32_RTOL)
        assert float(reranked[query, rest].max()) < float(reranked[query, top].min())
        # the others: in candidate order (rest is sorted by candidate score, descending)
        assert bool((reranked[query, rest][1:] < reranked[query, rest][:-1]).all())


def test_rerank_with_every_item_is_the_exact_ranking():
    samples_x = gaussian_samples(3, 2, 8, 0.2, seed=21)
    samples_y = gaussian_samples(9, 2, 8, 0.2, seed=22)
    candidates = torch.zeros(3, 9)
    out = sampled_match.rerank_top_k(candidates, samples_x, samples_y, 5.0, 5.0, 100, out=candidates)
    assert out is candidates
    assert_close_float32(out, brute_force_log_p(samples_x, samples_y, 5.0, 5.0))


def test_scorer_rerank_top_k_ranks_csd_candidates_by_sampled_log_p():
    g = torch.Generator().manual_seed(23)
    inputs = dict(
        image_embeds=torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1),
        text_embeds=torch.nn.functional.normalize(torch.randn(10, 8, generator=g), dim=-1),
        image_log_sigma2=torch.randn(5, 8, generator=g) * 0.3 - 3.0,
        text_log_sigma2=torch.randn(10, 8, generator=g) * 0.3 - 3.0,
        num_samples=3, negative_scale=5.0, shift=5.0,
    )  # fmt: skip
    scorer = SampledMatchScorer(**inputs, rerank_top_k=4)
    csd = -pairwise_csd(inputs["image_embeds"], inputs["image_log_sigma2"], inputs["text_embeds"], inputs["text_log_sigma2"])
    exact = brute_force_log_p(scorer.image_samples, scorer.text_samples, 5.0, 5.0)
    rows = scorer.image_rows(slice(0, 5))
    for query in range(5):
        top = csd[query].topk(4).indices
        torch.testing.assert_close(rows[query, top].double(), exact[query, top], atol=FLOAT32_ATOL, rtol=FLOAT32_RTOL)
    with pytest.raises(ValueError, match="rerank_top_k ranks candidates by CSD"):
        SampledMatchScorer(image_samples=scorer.image_samples, text_samples=scorer.text_samples,
                           negative_scale=5.0, shift=5.0, rerank_top_k=4)  # fmt: skip
    with pytest.raises(ValueError, match="rerank_top_k must be a positive integer"):
        SampledMatchScorer(**inputs, rerank_top_k=0)


def test_tiles_on_parallel_threads_fill_every_row_like_one_thread():
    samples_x = gaussian_samples(23, 3, 8, 0.2, seed=24)
    samples_y = gaussian_samples(30, 3, 8, 0.2, seed=25)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # tasks on 3 threads, torch on one thread in each
        parallel = sampled_match_log_prob(samples_x, samples_y, 5.0, 5.0, max_memory=4 * 9 * 4 * 5)
        candidates = torch.randn(23, 30, generator=torch.Generator().manual_seed(26))
        reranked = sampled_match.rerank_top_k(candidates, samples_x, samples_y, 5.0, 5.0, 4)
        assert torch.get_num_threads() == 3  # restored after the tasks
    finally:
        torch.set_num_threads(threads)
    expected = brute_force_log_p(samples_x, samples_y, 5.0, 5.0)
    assert_close_float32(parallel, expected)
    top = candidates.topk(4, dim=1).indices
    assert_close_float32(reranked.gather(1, top), expected.gather(1, top))
