"""hf_pcme.uncertainty against brute-force computations done in the test (loops, hand formulas)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_pcme.uncertainty import (
    PerQueryMetrics,
    binned_metrics,
    calibration,
    calibration_pairs,
    embedding_uncertainty,
    failure_auroc,
    per_query_metrics,
    uncertainty_bins,
    vagueness_correlation,
)


# ---------------------------------------------------------------------------- brute force references
def average_ranks(values):
    """1-based ranks, ties share their mean rank (by hand: a double loop)."""
    values = list(values)
    return np.array([
        1 + sum(other < value for other in values) + 0.5 * (sum(other == value for other in values) - 1)
        for value in values
    ])  # fmt: skip


def spearman_by_hand(x, y):
    """Pearson correlation of the average ranks."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / math.sqrt((rx**2).sum() * (ry**2).sum()))


def kendall_tau_b_by_hand(x, y):
    concordant = discordant = ties_x = ties_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx == dy:
                concordant += 1
            else:
                discordant += 1
    return (concordant - discordant) / math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))


def auroc_by_pairs(uncertainty, hits):
    """P(u_fail > u_hit) + 1/2 P(equal), over every (failure, hit) pair."""
    failures = [u for u, h in zip(uncertainty, hits) if not h]
    successes = [u for u, h in zip(uncertainty, hits) if h]
    total = sum(1.0 if f > s else 0.5 if f == s else 0.0 for f in failures for s in successes)
    return total / (len(failures) * len(successes))


def query_metrics_by_loops(scores_row, pairs, plausible):
    """(R@1 hit, R-Precision, PMRP) of one query: sort by score, ties put the irrelevant item first."""

    def ranked(relevant):
        order = sorted(range(len(scores_row)), key=lambda j: (-scores_row[j], bool(relevant[j])))
        return [bool(relevant[j]) for j in order]

    flags = ranked(pairs)
    hit = 1.0 if flags[0] else 0.0
    r = sum(flags)
    r_precision = sum(flags[:r]) / r
    plausible_flags = ranked(plausible)
    r_plausible = sum(plausible_flags)
    pmrp = sum(plausible_flags[:r_plausible]) / r_plausible if r_plausible else float("nan")
    return hit, r_precision, pmrp


# ---------------------------------------------------------------------------- uncertainty, vagueness
def test_embedding_uncertainty_is_mean_variance():
    log_sigma2 = torch.tensor([[0.0, math.log(3.0)], [math.log(0.5), math.log(0.25)]])
    assert embedding_uncertainty(log_sigma2) == pytest.approx([2.0, 0.375])


def test_vagueness_correlation_equals_hand_ranks_with_ties():
    rng = np.random.default_rng(0)
    uncertainty = rng.integers(0, 6, 40).astype(float)  # many ties
    vagueness = uncertainty * 2 + rng.integers(0, 5, 40)
    result = vagueness_correlation(torch.tensor(uncertainty), vagueness)
    assert result.spearman_rho == pytest.approx(spearman_by_hand(uncertainty, vagueness))
    assert result.kendall_tau == pytest.approx(kendall_tau_b_by_hand(uncertainty, vagueness))
    assert result.num_queries == 40 and 0 <= result.spearman_p < 1e-3 and 0 <= result.kendall_p < 1e-3


def test_vagueness_correlation_of_reversed_order_is_minus_one():
    result = vagueness_correlation([1.0, 2.0, 3.0, 4.0], [40, 30, 20, 10])
    assert result.spearman_rho == pytest.approx(-1.0) and result.kendall_tau == pytest.approx(-1.0)


def test_constant_uncertainty_gives_undefined_correlation():
    result = vagueness_correlation([1.0, 1.0, 1.0], [1, 2, 3])
    assert math.isnan(result.spearman_rho) and math.isnan(result.kendall_tau)


# ---------------------------------------------------------------------------- per-query metrics
def _tiny_retrieval_case(seed):
    rng = np.random.default_rng(seed)
    num_images, captions_per_image = 6, 3
    text_to_image = rng.permutation(np.repeat(np.arange(num_images), captions_per_image))
    scores = rng.integers(0, 5, (num_images, len(text_to_image))).astype(np.float32)  # ties on purpose
    plausible = rng.random(scores.shape) < 0.3
    plausible[text_to_image, np.arange(len(text_to_image))] = True  # a pair is always plausible
    return scores, text_to_image, plausible


@pytest.mark.parametrize("seed, ranking_path", [(0, "kernel"), (1, "kernel"), (0, "torch")])
def test_per_query_metrics_equal_loops_over_each_query(seed, ranking_path, monkeypatch):
    from hf_pcme.metrics import ranking

    monkeypatch.setattr(ranking, "USE_KERNEL", ranking_path == "kernel")  # the compiled CPU kernel or the torch ops
    scores, text_to_image, plausible = _tiny_retrieval_case(seed)
    result = per_query_metrics(text_to_image, scores=scores, plausibility=plausible)
    pairs = text_to_image[None, :] == np.arange(scores.shape[0])[:, None]
    for direction, matrix, pair_matrix, plausible_matrix in (
        ("i2t", scores, pairs, plausible),
        ("t2i", scores.T, pairs.T, plausible.T),
    ):
        expected = np.array([
            query_metrics_by_loops(matrix[q].tolist(), pair_matrix[q].tolist(), plausible_matrix[q].tolist())
            for q in range(matrix.shape[0])
        ])  # fmt: skip
        values = result[direction]
        np.testing.assert_allclose(values.recall_at_1, expected[:, 0])
        np.testing.assert_allclose(values.r_precision, expected[:, 1])
        np.testing.assert_allclose(values.pmrp, expected[:, 2])


def test_per_query_pmrp_with_labels_averages_zetas_and_skips_unlabelled_queries():
    rng = np.random.default_rng(3)
    text_to_image = np.repeat(np.arange(5), 2)
    scores = rng.random((5, 10)).astype(np.float32)
    labels = rng.integers(0, 2, (5, 4))
    labels[2] = 0  # an unlabelled image: neither scored nor ranked by PMRP
    result = per_query_metrics(text_to_image, scores=scores, image_labels=labels, zetas=(0, 1))
    assert np.isnan(result["i2t"].pmrp[2]) and np.isnan(result["t2i"].pmrp[4:6]).all()
    hamming = (labels[:, None, :] != labels[None, :, :]).sum(-1)
    labelled = labels.sum(1) > 0
    for q in (0, 1, 3, 4):
        kept = [j for j in range(10) if labelled[text_to_image[j]]]
        per_zeta = []
        for zeta in (0, 1):
            plausible = [bool(hamming[q, text_to_image[j]] <= zeta) for j in kept]
            per_zeta.append(query_metrics_by_loops([float(scores[q, j]) for j in kept], plausible, plausible)[2])
        assert result["i2t"].pmrp[q] == pytest.approx(np.mean(per_zeta))


# ---------------------------------------------------------------------------- binned analysis
def test_bins_are_equal_count_in_increasing_uncertainty():
    uncertainty = np.array([5.0, 1.0, 3.0, 3.0, 0.0, 9.0, 2.0])
    bins = uncertainty_bins(uncertainty, 3)
    assert [b.tolist() for b in bins] == [[4, 1, 6], [2, 3], [0, 5]]  # sizes 3, 2, 2; ties in index order


def test_binned_metrics_equal_hand_binning():
    rng = np.random.default_rng(5)
    uncertainty = rng.random(23)
    hits = (rng.random(23) < 0.6).astype(float)
    r_precision = rng.random(23)
    r_precision[[0, 7]] = np.nan  # not scored
    result = binned_metrics(uncertainty, {"R@1": hits, "r_precision": r_precision}, num_bins=4)
    order = sorted(range(23), key=lambda q: uncertainty[q])
    sizes = [6, 6, 6, 5]
    start = 0
    expected_hits, expected_rp = [], []
    for size in sizes:
        members = order[start : start + size]
        start += size
        expected_hits.append(100 * sum(hits[q] for q in members) / size)
        scored = [q for q in members if not np.isnan(r_precision[q])]
        expected_rp.append(100 * sum(r_precision[q] for q in scored) / len(scored))
    assert result.bin_counts.tolist() == sizes
    np.testing.assert_allclose(result.metrics["R@1"], expected_hits)
    np.testing.assert_allclose(result.metrics["r_precision"], expected_rp)
    assert result.spearman_rho["R@1"] == pytest.approx(spearman_by_hand(range(4), expected_hits))
    assert result.mean_uncertainty[0] == pytest.approx(np.mean(sorted(uncertainty)[:6]))


def test_binned_metrics_of_per_query_values_and_falling_quality():
    uncertainty = np.arange(20, dtype=float)
    hits = (np.arange(20) < 10).astype(float)  # the certain half hits, the uncertain half fails
    result = binned_metrics(uncertainty, PerQueryMetrics(recall_at_1=hits, r_precision=hits), num_bins=5)
    assert result.metrics["R@1"].tolist() == [100.0, 100.0, 50.0, 0.0, 0.0]
    assert result.spearman_rho["R@1"] < -0.9 and set(result.metrics) == {"R@1", "r_precision"}


# ---------------------------------------------------------------------------- failure AUROC
def test_failure_auroc_equals_pair_loop_with_ties():
    rng = np.random.default_rng(7)
    uncertainty = rng.integers(0, 5, 30).astype(float)
    hits = rng.random(30) < 0.5
    assert failure_auroc(uncertainty, hits) == pytest.approx(auroc_by_pairs(uncertainty, hits))


def test_failure_auroc_perfect_and_skips_unscored_queries():
    assert failure_auroc([0.1, 0.2, 0.8, 0.9, 5.0], [1, 1, 0, 0, np.nan]) == 1.0
    assert failure_auroc([0.9, 0.1], [True, False]) == 0.0


# ---------------------------------------------------------------------------- calibration
def test_calibration_equals_hand_loop():
    rng = np.random.default_rng(11)
    probabilities = rng.random((7, 9))
    probabilities[0, :3] = [0.0, 1.0, 0.5]  # the edges: 1.0 falls in the last bin
    target = (rng.random((7, 9)) < probabilities).astype(float)
    result = calibration(probabilities, target, num_bins=5)
    members = {b: [] for b in range(5)}
    for p, t in zip(probabilities.ravel(), target.ravel()):
        members[min(int(p * 5), 4)].append((p, t))
    ece, worst = 0.0, 0.0
    for b, pairs in members.items():
        assert result.counts[b] == len(pairs)
        if pairs:
            confidence = sum(p for p, _ in pairs) / len(pairs)
            observed = sum(t for _, t in pairs) / len(pairs)
            assert result.mean_confidence[b] == pytest.approx(confidence)
            assert result.observed_frequency[b] == pytest.approx(observed)
            ece += len(pairs) / probabilities.size * abs(observed - confidence)
            worst = max(worst, abs(observed - confidence))
    assert result.ece == pytest.approx(ece) and result.max_calibration_error == pytest.approx(worst)
    assert result.num_pairs == 63 and result.num_positive == target.sum()


def test_perfectly_calibrated_soft_targets_have_zero_ece():
    probabilities = np.array([0.05, 0.05, 0.55, 0.95])
    assert calibration(probabilities, probabilities, num_bins=10).ece == pytest.approx(0.0)


def test_calibration_pairs_all_or_a_seeded_subgrid():
    images, texts = calibration_pairs(4, 5, max_pairs=20)
    assert images.tolist() == [0, 1, 2, 3] and texts.tolist() == [0, 1, 2, 3, 4]
    images, texts = calibration_pairs(100, 400, max_pairs=1000, seed=3)
    # the same fraction sqrt(1000 / 40000) = 0.158 of each: round(15.8) = 16 images, 1000 // 16 = 62 captions
    assert len(images) == 16 and len(texts) == 62
    assert (np.diff(images) > 0).all() and (np.diff(texts) > 0).all()
    again = calibration_pairs(100, 400, max_pairs=1000, seed=3)
    assert np.array_equal(again[0], images) and np.array_equal(again[1], texts)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: vagueness_correlation([1.0, 2.0], [1.0]), "lengths"),
        (lambda: vagueness_correlation([1.0, np.nan], [1.0, 2.0]), "uncertainty has 1 NaN"),
        (lambda: vagueness_correlation([1.0, 2.0], [1.0, np.inf]), "vagueness has 1 NaN"),
        (lambda: vagueness_correlation([], []), "uncertainty is empty"),
        (lambda: binned_metrics([1.0, 2.0], {"R@1": [1.0, 0.0]}, num_bins=0), "num_bins"),
        (lambda: binned_metrics([1.0, 2.0], {"R@1": [1.0, 0.0]}, num_bins=3), "num_bins=3"),
        (lambda: binned_metrics([1.0, 2.0], {"R@1": [1.0, 0.0, 1.0]}), "lengths"),
        (lambda: binned_metrics([1.0, 2.0], {"pmrp": [np.nan, np.nan]}, num_bins=1), "per_query\\['pmrp'\\].*no query"),
        (lambda: failure_auroc([1.0, 2.0], [1, 1]), "r1_hit has 0 failure"),
        (lambda: failure_auroc([1.0, 2.0], [1, 0.5]), "r1_hit must hold 0 / 1"),
        (lambda: failure_auroc([np.nan, 2.0], [1, 0]), "uncertainty has 1 NaN"),
        (lambda: calibration([0.2, 0.4], [0, 0]), "target has no positive"),
        (lambda: calibration([0.2, 1.4], [0, 1]), "match_prob must lie in"),
        (lambda: calibration([0.2, 0.4], [0, 1, 1]), "same shape"),
        (lambda: calibration([0.2, np.nan], [0, 1]), "match_prob has 1 NaN"),
        (lambda: calibration([0.2, 0.4], [0, 1], num_bins=0), "num_bins"),
        (lambda: embedding_uncertainty(None), "log_sigma2"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------- one model's report, end to end
@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    from hf_pcme.data import load_dataset_by_name, make_retrieval_split

    cache_dir = tmp_path_factory.mktemp("shapes_cache")
    options = {"num_images": 8, "num_eval_images": 12, "image_size": 32}
    return make_retrieval_split(load_dataset_by_name("shapes", split="test", cache_dir=cache_dir, **options))


def _embed(model, view, scorer):
    from accelerate import Accelerator

    from hf_pcme.testing import tiny_processor
    from hf_pcme.training.evaluation import encode_for_scorer

    return encode_for_scorer(model, tiny_processor(), view, Accelerator(), scorer=scorer, batch_size=64)


def test_write_uncertainty_report_writes_json_and_plots(tiny_shapes, tmp_path):
    import json

    from hf_pcme import PCMEModel
    from hf_pcme.testing import tiny_pcme_config
    from hf_pcme.uncertainty import REPORT_FILE, format_uncertainty_report, write_uncertainty_report

    torch.manual_seed(0)
    model = PCMEModel(tiny_pcme_config()).eval()
    view = tiny_shapes
    images, texts = _embed(model, view, "sampled")
    report = write_uncertainty_report(tmp_path, model, view, images, texts, scorer="sampled", name="tiny", num_bins=4)

    written = json.loads((tmp_path / REPORT_FILE).read_text())
    assert written["name"] == "tiny" and written["calibration_target"] == "plausibility"
    for path in report.plots.values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(report.plots) == {"uncertainty_vs_vagueness", "binned_metrics", "reliability_diagram"}
    # per-query values average to the reported metric
    assert report.metrics["t2i_pmrp"] == pytest.approx(100 * np.nanmean(report.arrays["t2i_pmrp"]))
    assert report.metrics["i2t_R@1"] == pytest.approx(100 * np.nanmean(report.arrays["i2t_R@1"]))
    # vagueness = plausible images per caption, by a loop over the captions
    vagueness = [int(view.plausibility(np.arange(view.num_images), [j]).sum()) for j in range(view.num_captions)]
    assert report.arrays["caption_vagueness"].tolist() == vagueness
    caption_sigma2 = texts.log_sigma2.exp().mean(-1).numpy()
    assert report.vagueness["caption"].spearman_rho == pytest.approx(spearman_by_hand(caption_sigma2, vagueness))
    assert written["vagueness"]["caption"]["spearman_rho"] == pytest.approx(report.vagueness["caption"].spearman_rho)
    # calibration on every pair (60 x 12 is below the default cap) against the exact plausibility
    match_prob = model.match_probability(images, texts).detach().numpy()
    plausible = view.plausibility(np.arange(view.num_images), np.arange(view.num_captions))
    assert report.calibration.num_pairs == view.num_images * view.num_captions
    assert report.calibration.ece == pytest.approx(calibration(match_prob, plausible.astype(float)).ece)
    assert [row["captions"] for row in report.levels] == [12] * 5
    text = format_uncertainty_report(report)
    assert "caption sigma^2 vs vagueness" in text and "ECE" in text


def test_report_of_a_deterministic_model_has_calibration_only(tiny_shapes, tmp_path):
    from hf_pcme import PCMEModel
    from hf_pcme.testing import tiny_pcme_config
    from hf_pcme.uncertainty import write_uncertainty_report

    model = PCMEModel(tiny_pcme_config(head_type="deterministic")).eval()
    images, texts = _embed(model, tiny_shapes, "cosine")
    report = write_uncertainty_report(tmp_path, model, tiny_shapes, images, texts, scorer="cosine",
                                      max_calibration_pairs=100)
    assert not report.binned and not report.vagueness and set(report.plots) == {"reliability_diagram"}
    assert report.calibration.num_pairs <= 100 and report.calibration.num_pairs >= 90


def test_evaluate_script_uncertainty_report(tmp_path, capsys):
    import importlib.util
    import json

    from hf_pcme import PCMEModel
    from hf_pcme.testing import tiny_pcme_config, tiny_processor

    folder = tmp_path / "model"
    PCMEModel(tiny_pcme_config(match_function="csd")).save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    spec = importlib.util.spec_from_file_location("evaluate_script", Path(__file__).parent.parent / "scripts/evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    options = {"num_images": 8, "num_eval_images": 12, "image_size": 32, "cache_dir": tmp_path / "cache"}
    report_dir = tmp_path / "report"
    metrics = script.main(["--model", str(folder), "--dataset", "shapes", "--split", "test", "--uncertainty-report",
                           "--output-dir", str(report_dir), *[f"--dataset-option={k}={v}" for k, v in options.items()]])
    written = json.loads((report_dir / "uncertainty_report.json").read_text())
    assert written["scorer"] == "csd" and written["metrics"]["t2i_pmrp"] == pytest.approx(metrics["t2i_pmrp"])
    assert (report_dir / "reliability_diagram.png").is_file() and (report_dir / "uncertainty_vs_vagueness.png").is_file()
    assert "uncertainty report:" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["coco", "cub"])
def test_report_without_plausibility_calibrates_against_pairs_or_classes(kind):
    from types import SimpleNamespace

    from hf_pcme import PCMEModel, ProbabilisticEmbedding
    from hf_pcme.testing import tiny_pcme_config
    from hf_pcme.uncertainty import compute_uncertainty_report

    generator = torch.Generator().manual_seed(0)
    model = PCMEModel(tiny_pcme_config(match_function="csd")).eval()
    text_to_image = np.repeat(np.arange(6), 2)

    def embeds(count):
        mean = torch.nn.functional.normalize(torch.randn(count, 8, generator=generator), dim=-1)
        return ProbabilisticEmbedding(mean=mean, log_sigma2=torch.randn(count, 8, generator=generator) - 2)

    images, texts = embeds(6), embeds(12)
    labels = np.array([[1, 0, 1], [1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [0, 1, 1]]) if kind == "coco" else None
    classes = np.array([0, 0, 1, 1, 2, 2]) if kind == "cub" else None
    view = SimpleNamespace(text_to_image=text_to_image, image_labels=labels, image_classes=classes, plausibility=None,
                           caption_specificity=None, num_images=6, num_captions=12)
    report = compute_uncertainty_report(model, view, images, texts, scorer="csd", num_bins=3)
    assert report.calibration_target == ("pairs" if kind == "coco" else "classes")
    same = (np.arange(6)[:, None] == text_to_image[None, :]) if kind == "coco" else (classes[:, None] == classes[text_to_image][None, :])
    match_prob = model.match_probability(images, texts).detach().numpy()
    assert report.calibration.ece == pytest.approx(calibration(match_prob, same.astype(float)).ece)
    assert report.calibration.num_positive == same.sum()
    assert not report.vagueness and not report.levels and set(report.binned) == {"i2t", "t2i"}
    assert report.metrics["i2t_pmrp"] == pytest.approx(100 * np.nanmean(report.arrays["i2t_pmrp"]))


def test_per_query_values_do_not_depend_on_chunks_folds_or_caption_order(monkeypatch):
    from hf_pcme.metrics import evaluate_retrieval, retrieval

    scores, text_to_image, plausible = _tiny_retrieval_case(2)
    reference = {}
    evaluate_retrieval(text_to_image=text_to_image, scores=scores, plausibility=plausible, per_query=reference)
    monkeypatch.setattr(retrieval, "SUB_BLOCK_ELEMENTS", 2 * scores.shape[1])  # several pieces per chunk
    chunked = {}
    means = evaluate_retrieval(text_to_image=text_to_image, scores=scores, plausibility=plausible, per_query=chunked,
                               chunk_size=4, protocol="coco", fold_size=3, num_workers=2)
    assert set(chunked) == set(reference)
    for name in reference:
        np.testing.assert_array_equal(chunked[name], reference[name])
        assert means[name] == pytest.approx(100 * np.nanmean(chunked[name]))
