"""Pairwise distances and PCME's sampled match probability against brute-force definitions."""

from __future__ import annotations

import math

import pytest
import torch

from hf_pcme.distances import (
    best_pair_scores,
    chunked_pairwise,
    iter_row_chunks,
    max_pair_similarity,
    pairwise_csd,
    pairwise_sampled_match_log_prob,
    pairwise_squared_l2,
    sample_gaussian,
    sampled_match_logits,
    score_vectors,
)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=_generator(seed), dtype=dtype)


def brute_force_log_probs(samples_x, samples_y, a: float, b: float) -> tuple[list[list[float]], list[list[float]]]:
    """PCME's definition, one pair of samples at a time: p = mean_jj' sigmoid(2(-a d + b))."""
    log_p, log_not_p = [], []
    for x in samples_x:
        row_p, row_not_p = [], []
        for y in samples_y:
            probs = []
            for x_sample in x:
                for y_sample in y:
                    squared = sum((float(u) - float(v)) ** 2 for u, v in zip(x_sample, y_sample))
                    logit = 2.0 * (-a * math.sqrt(squared + 1e-6) + b)
                    probs.append(1.0 / (1.0 + math.exp(-logit)))
            p = sum(probs) / len(probs)
            row_p.append(math.log(p))
            row_not_p.append(math.log(1.0 - p))
        log_p.append(row_p)
        log_not_p.append(row_not_p)
    return log_p, log_not_p


def naive_broadcast_log_probs(samples_x, samples_y, a, b):
    """The original's broadcast (N, M, J, J', D) difference, kept differentiable for gradient checks."""
    difference = samples_x[:, None, :, None, :] - samples_y[None, :, None, :, :]
    logits = 2.0 * (-a * torch.sqrt(difference.pow(2).sum(-1) + 1e-6) + b)
    log_count = math.log(samples_x.shape[1] * samples_y.shape[1])
    log_p = torch.logsumexp(torch.nn.functional.logsigmoid(logits), dim=(2, 3)) - log_count
    log_not_p = torch.logsumexp(torch.nn.functional.logsigmoid(-logits), dim=(2, 3)) - log_count
    return log_p, log_not_p


def test_pairwise_squared_l2_equals_bruteforce():
    x, y = _randn(4, 6, seed=1), _randn(5, 6, seed=2)
    expected = torch.tensor([[sum((x[i, d] - y[j, d]) ** 2 for d in range(6)) for j in range(5)] for i in range(4)])
    torch.testing.assert_close(pairwise_squared_l2(x, y), expected.to(torch.float64))


def test_pairwise_squared_l2_never_negative_for_identical_points():
    x = _randn(8, 300, seed=3, dtype=torch.float32) * 30.0  # large norms: cancellation in the matmul form
    assert pairwise_squared_l2(x, x).min() >= 0.0


def test_pairwise_csd_equals_bruteforce():
    mean_x, mean_y = _randn(3, 4, seed=1), _randn(2, 4, seed=2)
    log_sigma2_x, log_sigma2_y = _randn(3, 4, seed=3), _randn(2, 4, seed=4)
    expected = torch.empty(3, 2, dtype=torch.float64)
    for i in range(3):
        for j in range(2):
            expected[i, j] = sum(
                (mean_x[i, d] - mean_y[j, d]) ** 2 + math.exp(log_sigma2_x[i, d]) + math.exp(log_sigma2_y[j, d])
                for d in range(4)
            )
    torch.testing.assert_close(pairwise_csd(mean_x, log_sigma2_x, mean_y, log_sigma2_y), expected)


def test_max_pair_similarity_is_the_best_of_all_embedding_pairs():
    x, y = _randn(3, 2, 5, seed=6), _randn(4, 3, 5, seed=7)  # K = 2 and K' = 3 embeddings per item
    expected = torch.tensor(
        [[max(float(x[i, k] @ y[j, l]) for k in range(2) for l in range(3)) for j in range(4)] for i in range(3)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(max_pair_similarity(x, y), expected)
    flat = x.reshape(6, 5) @ y.reshape(12, 5).t()
    torch.testing.assert_close(best_pair_scores(flat, 3, 2, 3), expected)
    assert best_pair_scores(flat, 6, 1, 1) is flat  # single embeddings: the scores themselves
    with pytest.raises(ValueError, match="x"):
        max_pair_similarity(x[:, 0], y)


def test_score_vectors_inner_products_are_minus_csd_in_both_directions():
    mean_v, mean_t = _randn(3, 4, seed=1), _randn(5, 4, seed=2)
    log_sigma2_v, log_sigma2_t = _randn(3, 4, seed=3), _randn(5, 4, seed=4)
    left = score_vectors(mean_v, log_sigma2_v, "csd", "left").squeeze(1).double()
    right = score_vectors(mean_t, log_sigma2_t, "csd", "right").squeeze(1).double()
    assert left.shape == (3, 6) and right.shape == (5, 6)  # D + 2
    for i in range(3):
        for j in range(5):
            csd = sum(
                (float(mean_v[i, d]) - float(mean_t[j, d])) ** 2
                + math.exp(float(log_sigma2_v[i, d])) + math.exp(float(log_sigma2_t[j, d]))
                for d in range(4)
            )
            assert float(left[i] @ right[j]) == pytest.approx(-csd, rel=1e-5)
            # t2i uses the same two matrices, transposed: same value
            assert float((right @ left.t())[j, i]) == pytest.approx(-csd, rel=1e-5)


def test_score_vectors_for_cosine_are_unit_means_on_both_sides():
    mean = _randn(4, 2, 3, seed=5)  # K = 2 embeddings per item
    for side in ("left", "right"):
        vectors = score_vectors(mean, None, "cosine", side)
        assert vectors.shape == (4, 2, 3) and vectors.dtype == torch.float32
        torch.testing.assert_close(vectors.double(), mean / mean.norm(dim=-1, keepdim=True), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="side"):
        score_vectors(mean, None, "cosine", "query")


def test_sampled_log_probs_equal_double_loop_over_samples():
    samples_x, samples_y = _randn(3, 2, 5, seed=1) * 0.5, _randn(4, 3, 5, seed=2) * 0.5
    a, b = 1.7, 2.2
    expected_p, expected_not_p = brute_force_log_probs(samples_x, samples_y, a, b)
    log_p, log_not_p = pairwise_sampled_match_log_prob(samples_x, samples_y, a, b, chunk_size=2)
    torch.testing.assert_close(log_p, torch.tensor(expected_p, dtype=torch.float64))
    torch.testing.assert_close(log_not_p, torch.tensor(expected_not_p, dtype=torch.float64))


def test_sampled_log_p_and_log_not_p_are_consistent():
    log_p, log_not_p = pairwise_sampled_match_log_prob(_randn(5, 3, 8, seed=1), _randn(6, 2, 8, seed=2), 0.8, 2.0)
    torch.testing.assert_close(log_p.exp() + log_not_p.exp(), torch.ones(5, 6, dtype=torch.float64))


def test_sampled_log_probs_stay_finite_and_exact_for_extreme_logits():
    # a = 200: logits of about -1000 for far pairs; sigmoid underflows but log-space must not.
    samples_x, samples_y = _randn(2, 2, 3, seed=1, dtype=torch.float32), _randn(3, 2, 3, seed=2, dtype=torch.float32)
    a, b = 200.0, 1.0
    log_p, log_not_p = pairwise_sampled_match_log_prob(samples_x, samples_y, a, b)
    for i in range(2):
        for j in range(3):
            logits = [
                2.0 * (-a * math.sqrt(float(((samples_x[i, k] - samples_y[j, l]) ** 2).sum()) + 1e-6) + b)
                for k in range(2)
                for l in range(2)
            ]
            # log mean sigmoid(s) = logsumexp(-softplus(-s)) - log 4, for s << 0: about logsumexp(s) - log 4
            top = max(logits)
            expected = top + math.log(sum(math.exp(s - top) for s in logits)) - math.log(4)
            assert math.isclose(float(log_p[i, j]), expected, rel_tol=1e-5)
    assert torch.isfinite(log_p).all() and torch.isfinite(log_not_p).all()


def test_float32_log_probs_keep_their_digits_when_p_is_near_zero_or_one():
    # Means 0.5 apart (p ~ 1) and 1.5 apart (p ~ 1e-7) with a = b = 15: log p and log(1 - p) are
    # then ~1e-7; a logsumexp-minus-log(J^2) form keeps no correct digit of them in float32.
    direction = torch.nn.functional.normalize(_randn(1, 64, seed=1), dim=-1)
    noise = 0.01 * _randn(3, 4, 64, seed=2)
    samples_x = noise[:1] + 0.0 * direction
    samples_y = torch.cat([noise[1:2] + 0.5 * direction, noise[2:3] + 1.5 * direction])
    exact_p, exact_not_p = pairwise_sampled_match_log_prob(samples_x, samples_y, 15.0, 15.0)
    log_p, log_not_p = pairwise_sampled_match_log_prob(samples_x.float(), samples_y.float(), 15.0, 15.0)
    assert -1e-5 < float(exact_p[0, 0]) < 0 and -1e-5 < float(exact_not_p[0, 1]) < 0  # the regime meant
    torch.testing.assert_close(log_p.double(), exact_p, rtol=1e-4, atol=0)
    torch.testing.assert_close(log_not_p.double(), exact_not_p, rtol=1e-4, atol=0)


@pytest.mark.parametrize("chunk_size", [1, 2, None])
def test_sampled_gradients_equal_autograd_of_broadcast_definition(chunk_size):
    samples_x = _randn(3, 2, 4, seed=1).requires_grad_()
    samples_y = _randn(4, 3, 4, seed=2).requires_grad_()
    a = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    weights_p, weights_not_p = _randn(3, 4, seed=3), _randn(3, 4, seed=4)

    def gradients(function):
        log_p, log_not_p = function(samples_x, samples_y, a, b)
        objective = (weights_p * log_p).sum() + (weights_not_p * log_not_p).sum()
        return torch.autograd.grad(objective, (samples_x, samples_y, a, b))

    ours = gradients(lambda *args: pairwise_sampled_match_log_prob(*args, chunk_size=chunk_size))
    reference = gradients(naive_broadcast_log_probs)
    for got, expected in zip(ours, reference):
        torch.testing.assert_close(got, expected)


def test_sampled_log_prob_passes_gradcheck():
    inputs = (
        _randn(2, 2, 3, seed=1).requires_grad_(),
        _randn(3, 2, 3, seed=2).requires_grad_(),
        torch.tensor(0.9, dtype=torch.float64, requires_grad=True),
        torch.tensor(0.5, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(
        lambda *args: pairwise_sampled_match_log_prob(*args, chunk_size=1), inputs, fast_mode=True
    )


def test_sampled_log_prob_of_half_inputs_is_float32_and_matches_float64():
    samples_x, samples_y = _randn(3, 2, 6, seed=1), _randn(2, 2, 6, seed=2)
    log_p, _ = pairwise_sampled_match_log_prob(samples_x.bfloat16(), samples_y.bfloat16(), 1.0, 1.0)
    expected, _ = pairwise_sampled_match_log_prob(samples_x.bfloat16().double(), samples_y.bfloat16().double(), 1.0, 1.0)
    assert log_p.dtype == torch.float32
    torch.testing.assert_close(log_p.double(), expected, rtol=1e-5, atol=1e-5)


def test_autocast_does_not_lower_the_precision_of_distances():
    x, y = _randn(6, 64, seed=1, dtype=torch.float32), _randn(5, 2, 64, seed=2, dtype=torch.float32)
    expected_l2 = pairwise_squared_l2(x, y[:, 0])
    expected_log_p, _ = pairwise_sampled_match_log_prob(x.view(3, 2, 64), y, 1.0, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        l2 = pairwise_squared_l2(x, y[:, 0])
        log_p, _ = pairwise_sampled_match_log_prob(x.view(3, 2, 64), y, 1.0, 1.0)
    assert l2.dtype == log_p.dtype == torch.float32
    torch.testing.assert_close(l2, expected_l2)
    torch.testing.assert_close(log_p, expected_log_p)


def test_sampled_match_logits_keep_pcme_factor_two():
    distance = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(
        sampled_match_logits(distance, torch.tensor(3.0), torch.tensor(1.0)), torch.tensor([-1.0, -10.0])
    )


def test_sample_gaussian_draws_mean_plus_standard_deviation_noise():
    mean = torch.tensor([[1.0, -2.0, 0.0]])
    log_sigma2 = torch.log(torch.tensor([[0.25, 4.0, 1.0]]))
    samples = sample_gaussian(mean, log_sigma2, num_samples=40000, generator=_generator(0))
    assert samples.shape == (1, 40000, 3)
    torch.testing.assert_close(samples.mean(1), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(samples.var(1), log_sigma2.exp(), atol=0, rtol=0.05)


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: pairwise_squared_l2(torch.zeros(3), torch.zeros(2, 3)), "x"),
        (lambda: pairwise_squared_l2(torch.zeros(2, 3), torch.zeros(2, 4)), "y"),
        (lambda: pairwise_csd(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2, 3)), "log_sigma2_x"),
        (lambda: pairwise_csd(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(1, 3)), "log_sigma2_y"),
        (lambda: pairwise_sampled_match_log_prob(torch.zeros(2, 3), torch.zeros(2, 1, 3), 1.0, 1.0), "samples_x"),
        (lambda: pairwise_sampled_match_log_prob(torch.zeros(2, 1, 3), torch.zeros(2, 3), 1.0, 1.0), "samples_y"),
        (lambda: pairwise_sampled_match_log_prob(torch.zeros(2, 1, 3), torch.zeros(2, 1, 4), 1.0, 1.0), "samples_y"),
        (lambda: pairwise_sampled_match_log_prob(torch.zeros(2, 1, 3), torch.zeros(2, 1, 3), torch.ones(2), 1.0), "negative_scale"),
        (lambda: sample_gaussian(torch.zeros(2, 3), torch.zeros(2, 4), 2), "log_sigma2"),
    ],
)
def test_shape_errors_name_the_argument(call, argument):
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        call()


def test_iter_row_chunks_cover_rows_once():
    slices = list(iter_row_chunks(7, 3))
    assert [(s.start, s.stop) for s in slices] == [(0, 3), (3, 6), (6, 7)]


def test_chunked_pairwise_blocks_assemble_the_full_matrix():
    x, y = _randn(7, 3, seed=1), _randn(4, 3, seed=2)
    blocks = list(chunked_pairwise(pairwise_squared_l2, (x,), (y,), chunk_size=3))
    assert [(rows.start, rows.stop) for rows, _ in blocks] == [(0, 3), (3, 6), (6, 7)]
    assembled = torch.cat([block for _, block in blocks])
    torch.testing.assert_close(assembled, pairwise_squared_l2(x, y))
