"""Retrieval metrics against brute-force Python loops (full sort per query, the documented tie rule)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_pcme.distances import pairwise_csd, pairwise_sampled_match_log_prob, sample_gaussian
from hf_pcme.metrics import SCORERS, build_scorer, coco_folds, evaluate_retrieval
from hf_pcme.metrics import rank_kernel, ranking, retrieval

KS = (1, 5, 10)


@pytest.fixture(autouse=True, params=["kernel", "torch"])
def ranking_path(request, monkeypatch):
    """Every test runs on both ranking paths: the compiled CPU kernel and the torch ops (GPU path)."""
    monkeypatch.setattr(ranking, "USE_KERNEL", request.param == "kernel")
    return request.param


# ---------------------------------------------------------------------------- brute force
def ranked_relevance(scores_row, relevant, considered=None):
    """Relevance flags in rank order: score descending, ties -> irrelevant items first (pessimistic)."""
    items = [j for j in range(len(scores_row)) if considered is None or considered[j]]
    items.sort(key=lambda j: (-float(scores_row[j]), bool(relevant[j])))
    return [bool(relevant[j]) for j in items]


def brute_query(scores_row, relevant, considered=None):
    """(best rank or None, R-Precision, AP@R) of one query; None if it has no relevant item."""
    flags = ranked_relevance(scores_row, relevant, considered)
    r = sum(flags)
    if r == 0:
        return None
    best = flags.index(True) + 1
    hits, ap = 0, 0.0
    for position, flag in enumerate(flags[:r], start=1):
        if flag:
            hits += 1
            ap += hits / position
    return best, hits / r, ap / r


def brute_direction(scores, relevant, ks=KS, considered=None, query_ok=None):
    """Mean R@K, R-P, MAP@R (percent) over the queries (rows) that have a relevant item."""
    results = []
    for q in range(scores.shape[0]):
        if query_ok is not None and not query_ok[q]:
            continue
        out = brute_query(scores[q].tolist(), relevant[q].tolist(), None if considered is None else considered.tolist())
        if out is not None:
            results.append(out)
    n = len(results)
    recall = {k: 100.0 * sum(best <= k for best, _, _ in results) / n for k in ks}
    return recall, 100.0 * sum(rp for _, rp, _ in results) / n, 100.0 * sum(ap for _, _, ap in results) / n


def brute_all(scores, text_to_image, labels=None, zetas=(0, 1, 2), ks=KS, positives=None):
    """Every metric of evaluate_retrieval with loops over a full score matrix (images x texts)."""
    num_images, num_texts = scores.shape
    pairs = torch.zeros(num_images, num_texts, dtype=torch.bool)
    pairs[text_to_image, torch.arange(num_texts)] = True
    out = {}
    for direction, matrix, rel in (("i2t", scores, pairs), ("t2i", scores.t(), pairs.t())):
        recall, _, _ = brute_direction(matrix, rel, ks)
        for k in ks:
            out[f"{direction}_R@{k}"] = recall[k]
        pos = rel if positives is None else (positives if direction == "i2t" else positives.t())
        recall_pos, rp, ap = brute_direction(matrix, pos, ks)
        out[f"{direction}_r_precision"], out[f"{direction}_map_at_r"] = rp, ap
        if positives is not None:
            for k in ks:
                out[f"{direction}_positives_R@{k}"] = recall_pos[k]
    out["rsum"] = sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks)
    if labels is not None:
        image_labelled = labels.sum(1) > 0
        hamming = (labels.unsqueeze(1) != labels.unsqueeze(0)).sum(-1)  # image x image
        for direction in ("i2t", "t2i"):
            values = []
            for zeta in zetas:
                plausible_images = hamming <= zeta
                if direction == "i2t":
                    rel = plausible_images[:, text_to_image]
                    considered, query_ok = image_labelled[text_to_image], image_labelled
                    _, rp, _ = brute_direction(scores, rel, ks, considered=considered, query_ok=query_ok)
                else:
                    rel = plausible_images[text_to_image]
                    considered, query_ok = image_labelled, image_labelled[text_to_image]
                    _, rp, _ = brute_direction(scores.t(), rel, ks, considered=considered, query_ok=query_ok)
                out[f"{direction}_pmrp_zeta{zeta}"] = rp
                values.append(rp)
            out[f"{direction}_pmrp"] = sum(values) / len(values)
    return out


def assert_same(result, expected):
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key


def random_case(num_images=12, captions=3, levels=4, seed=0, shuffle=True):
    """Integer-valued scores (many ties), several captions per image, sparse multi-hot labels."""
    g = torch.Generator().manual_seed(seed)
    text_to_image = torch.arange(num_images).repeat_interleave(captions)
    if shuffle:
        text_to_image = text_to_image[torch.randperm(text_to_image.numel(), generator=g)]
    scores = torch.randint(0, levels, (num_images, text_to_image.numel()), generator=g).float()
    labels = (torch.rand(num_images, 6, generator=g) < 0.3).float()
    labels[0] = 0  # one image without instance labels
    return scores, text_to_image, labels


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_metrics_equal_bruteforce_with_ties(seed):
    scores, text_to_image, labels = random_case(seed=seed)
    result = evaluate_retrieval(scores=scores, text_to_image=text_to_image, image_labels=labels)
    assert_same(result, brute_all(scores, text_to_image, labels))


def test_levels_without_the_image_pair_table_match_bruteforce(monkeypatch):
    # large image sets compute the PMRP levels block by block instead of one image x image table
    monkeypatch.setattr(retrieval, "LEVEL_TABLE_IMAGES", 0)
    scores, text_to_image, labels = random_case(seed=3)
    result = evaluate_retrieval(
        scores=scores, text_to_image=text_to_image, image_labels=labels, protocol="coco", fold_size=4
    )
    assert_same(result, brute_all(scores, text_to_image, labels))


def test_float64_scores_match_float32_ranking():
    scores, text_to_image, labels = random_case(seed=4)
    as64 = evaluate_retrieval(scores=scores.double(), text_to_image=text_to_image, image_labels=labels)
    assert as64 == evaluate_retrieval(scores=scores, text_to_image=text_to_image, image_labels=labels)
    assert_same(as64, brute_all(scores, text_to_image, labels))


def test_continuous_scores_and_variable_caption_counts_equal_bruteforce():
    g = torch.Generator().manual_seed(3)
    text_to_image = torch.tensor([0, 1, 1, 2, 2, 2, 3, 4, 4, 4, 4, 5, 0, 3, 5, 6, 7, 7])
    scores = torch.randn(8, text_to_image.numel(), generator=g)
    labels = (torch.rand(8, 5, generator=g) < 0.4).float()
    result = evaluate_retrieval(scores=scores, text_to_image=text_to_image, image_labels=labels)
    assert_same(result, brute_all(scores, text_to_image, labels))


@pytest.mark.parametrize("buckets", [3, 64])
def test_many_buckets_with_ties_across_edges_match_bruteforce(buckets, monkeypatch):
    # rounded scores keep exact ties; the bucket count is forced so that targets land in every bucket
    monkeypatch.setattr(ranking, "num_buckets", lambda num_items: buckets)
    g = torch.Generator().manual_seed(4)
    text_to_image = torch.arange(80).repeat_interleave(5)
    scores = (torch.randn(80, 400, generator=g) * 4).round() / 4
    labels = (torch.rand(80, 8, generator=g) < 0.15).float()
    result = evaluate_retrieval(
        scores=scores, text_to_image=text_to_image, image_labels=labels, chunk_size=7, protocol="coco", fold_size=20
    )
    assert_same(result, brute_all(scores, text_to_image, labels))


def sorted_reference(scores, relevant, considered=None, query_ok=None):
    """Vectorised R-Precision with a full argsort (valid without ties): mean over queries with R > 0."""
    if considered is not None:
        scores = scores.masked_fill(~considered, -math.inf)
        relevant = relevant & considered
    r = relevant.sum(1)
    order = torch.argsort(scores, dim=1, descending=True)
    ranked = relevant.gather(1, order).long().cumsum(1)
    hits = ranked.gather(1, (r - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
    ok = (r > 0) if query_ok is None else (r > 0) & query_ok
    return 100.0 * float((hits[ok].double() / r[ok].double()).mean())


def test_realistic_size_pmrp_equals_sorted_reference():
    # 1,000 captions: the real bucket counts; a frequent category makes R large (deep targets)
    g = torch.Generator().manual_seed(14)
    text_to_image = torch.arange(200).repeat_interleave(5)
    scores = torch.randn(200, 1000, generator=g)
    rates = torch.full((20,), 0.05)
    rates[0] = 0.5
    labels = (torch.rand(200, 20, generator=g) < rates).float()
    result = evaluate_retrieval(
        scores=scores, text_to_image=text_to_image, image_labels=labels, protocol="coco", fold_size=100
    )
    labelled = labels.sum(1) > 0
    hamming = (labels.unsqueeze(1) != labels.unsqueeze(0)).sum(-1)
    for zeta in (0, 1, 2):
        plausible = (hamming <= zeta)[:, text_to_image]
        i2t = sorted_reference(scores, plausible, labelled[text_to_image].expand(200, -1), labelled)
        t2i = sorted_reference(scores.t(), plausible.t(), labelled.expand(1000, -1), labelled[text_to_image])
        assert result[f"i2t_pmrp_zeta{zeta}"] == pytest.approx(i2t, abs=1e-9)
        assert result[f"t2i_pmrp_zeta{zeta}"] == pytest.approx(t2i, abs=1e-9)
        fold = slice(100, 200), slice(500, 1000)  # the second 1K fold
        fold_i2t = sorted_reference(
            scores[fold], plausible[fold], labelled[text_to_image][fold[1]].expand(100, -1), labelled[fold[0]]
        )
        first = sorted_reference(
            scores[:100, :500], plausible[:100, :500], labelled[text_to_image][:500].expand(100, -1), labelled[:100]
        )
        assert result[f"1k/i2t_pmrp_zeta{zeta}"] == pytest.approx((first + fold_i2t) / 2, abs=1e-9)
    assert result["i2t_pmrp_zeta2"] > 20  # deep targets indeed


def test_constant_scores_get_pessimistic_ranks():
    text_to_image = torch.arange(4).repeat_interleave(2)
    scores = torch.zeros(4, 8)
    result = evaluate_retrieval(scores=scores, text_to_image=text_to_image, ks=(1, 6, 7))
    # every caption ties; the 6 wrong captions come first, so the best right one is 7th
    assert result["i2t_R@6"] == 0.0 and result["i2t_R@7"] == 100.0
    # t2i: 3 wrong images tie ahead of the right one
    assert result["t2i_R@1"] == 0.0 and result["t2i_R@6"] == 100.0
    assert result["i2t_r_precision"] == 0.0 and result["i2t_map_at_r"] == 0.0


def test_rank_by_hand():
    # image 0: captions 0, 1; image 1: caption 2.   i2t row 0 ranks captions 2 > 1 > 0.
    scores = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.2, 0.8]])
    result = evaluate_retrieval(scores=scores, text_to_image=[0, 0, 1], ks=(1, 2))
    # i2t: image 0 best positive at rank 2, image 1 at rank 1 -> R@1 = 50, R@2 = 100
    assert result["i2t_R@1"] == 50.0 and result["i2t_R@2"] == 100.0
    # image 0: R = 2, top-2 = {2, 1}: one hit -> R-P 1/2, AP@R = (1/2)(1/2) = 1/4; image 1: 1, 1
    assert result["i2t_r_precision"] == pytest.approx(100 * (0.5 + 1) / 2)
    assert result["i2t_map_at_r"] == pytest.approx(100 * (0.25 + 1) / 2)
    # t2i: caption 0 -> image 1 (0.3) above image 0 (0.1): miss; caption 1: 0.5 > 0.2, hit;
    # caption 2 -> image 0 (0.9) above image 1 (0.8): miss
    assert result["t2i_R@1"] == pytest.approx(100 / 3)


# ---------------------------------------------------------------------------- PMRP
def test_pmrp_queries_without_plausible_item_are_skipped():
    scores, text_to_image, _ = random_case(num_images=6, captions=2, seed=5)
    plausible = torch.zeros(6, 12, dtype=torch.bool)
    plausible[1, :5] = True
    plausible[3, 4:] = True  # images 0, 2, 4, 5 have no plausible caption
    result = evaluate_retrieval(scores=scores, text_to_image=text_to_image, plausibility=plausible)
    _, expected_i2t, _ = brute_direction(scores, plausible)
    _, expected_t2i, _ = brute_direction(scores.t(), plausible.t())
    assert result["i2t_pmrp"] == pytest.approx(expected_i2t)
    assert result["t2i_pmrp"] == pytest.approx(expected_t2i)
    assert "i2t_pmrp_zeta0" not in result


def test_plausibility_callable_equals_matrix():
    scores, text_to_image, _ = random_case(num_images=6, captions=2, seed=6)
    plausible = torch.rand(6, 12, generator=torch.Generator().manual_seed(0)) < 0.3
    from_matrix = evaluate_retrieval(scores=scores, text_to_image=text_to_image, plausibility=plausible)
    from_callable = evaluate_retrieval(
        scores=scores, text_to_image=text_to_image, plausibility=lambda images, texts: plausible[images][:, texts]
    )
    assert from_matrix == from_callable


def test_class_labels_pmrp_and_positives():
    g = torch.Generator().manual_seed(7)
    classes = torch.tensor([0, 1, 0, 2, 1, 0, -1, 2])
    text_to_image = torch.arange(8).repeat_interleave(3)
    scores = torch.randint(0, 5, (8, 24), generator=g).float()
    result = evaluate_retrieval(scores=scores, text_to_image=text_to_image, image_classes=classes)
    same = (classes.unsqueeze(1) == classes.unsqueeze(0)) & (classes >= 0).unsqueeze(1)
    expected = brute_all(scores, text_to_image, positives=same[:, text_to_image])
    assert_same(result, expected)
    # PMRP by class: R-Precision over labelled items and queries
    labelled = classes >= 0
    relevant = same[:, text_to_image]
    _, pmrp_i2t, _ = brute_direction(scores, relevant, considered=labelled[text_to_image], query_ok=labelled)
    assert result["i2t_pmrp"] == pytest.approx(pmrp_i2t)


def test_explicit_positives_by_id_like_eccv():
    scores, text_to_image, _ = random_case(num_images=5, captions=2, seed=8, shuffle=False)
    image_ids = [101, 102, 103, 104, 105]
    text_ids = [f"c{j}" for j in range(10)]
    extra_i2t = {101: ["c0", "c1", "c4"], 103: ["c5", "c9"]}  # only 2 image queries have positives
    extra_t2i = {"c0": [101, 102], "c7": [104]}
    result = evaluate_retrieval(
        scores=scores, text_to_image=text_to_image, positives={"i2t": extra_i2t, "t2i": extra_t2i},
        image_ids=image_ids, text_ids=text_ids,
    )  # fmt: skip
    i2t = torch.zeros(5, 10, dtype=torch.bool)
    i2t[0, [0, 1, 4]] = True
    i2t[2, [5, 9]] = True
    t2i = torch.zeros(10, 5, dtype=torch.bool)
    t2i[0, [0, 1]] = True
    t2i[7, 3] = True
    recall, rp, ap = brute_direction(scores, i2t)
    assert result["i2t_r_precision"] == pytest.approx(rp) and result["i2t_map_at_r"] == pytest.approx(ap)
    assert result["i2t_positives_R@1"] == pytest.approx(recall[1])
    _, rp, ap = brute_direction(scores.t(), t2i)
    assert result["t2i_r_precision"] == pytest.approx(rp) and result["t2i_map_at_r"] == pytest.approx(ap)
    # Recall@K still counts the ground-truth pairs
    assert result["i2t_R@1"] == pytest.approx(brute_all(scores, text_to_image)["i2t_R@1"])


# ---------------------------------------------------------------------------- 1K protocol
def test_coco_folds_split_by_hand():
    text_to_image = torch.tensor([3, 0, 1, 2, 3, 0, 1, 2])
    folds = coco_folds(text_to_image, num_images=4, fold_size=2)
    assert [f[0].tolist() for f in folds] == [[0, 1], [2, 3]]
    assert [f[1].tolist() for f in folds] == [[1, 2, 5, 6], [0, 3, 4, 7]]


def test_1k_protocol_averages_folds_computed_by_hand():
    scores, text_to_image, labels = random_case(num_images=6, captions=3, seed=9)
    result = evaluate_retrieval(
        scores=scores, text_to_image=text_to_image, image_labels=labels, protocol="coco", fold_size=2
    )
    fold_results = []
    for start in (0, 2, 4):  # fold f = images [2f, 2f + 2) and their captions, by hand
        captions = [j for j in range(18) if start <= int(text_to_image[j]) < start + 2]
        fold_scores = scores[start : start + 2][:, captions]
        fold_results.append(brute_all(fold_scores, text_to_image[captions] - start, labels[start : start + 2]))
    for key in fold_results[0]:
        if not all(key in r for r in fold_results):
            continue
        assert result[f"1k/{key}"] == pytest.approx(sum(r[key] for r in fold_results) / 3, abs=1e-9), key
    assert_same(result, brute_all(scores, text_to_image, labels))  # unprefixed = all images
    assert "5k/i2t_R@1" not in result


def test_1k_pmrp_skips_folds_without_labelled_queries():
    scores, text_to_image, labels = random_case(num_images=4, captions=2, seed=10)
    labels[:2] = 0  # fold 0 has no labelled image
    labels[2:] = torch.tensor([[1.0, 0, 0, 0, 0, 0], [1.0, 1, 0, 0, 0, 0]])
    result = evaluate_retrieval(
        scores=scores, text_to_image=text_to_image, image_labels=labels, protocol="coco", fold_size=2
    )
    captions = [j for j in range(8) if int(text_to_image[j]) >= 2]
    fold = brute_all(scores[2:][:, captions], text_to_image[captions] - 2, labels[2:])
    assert result["1k/i2t_pmrp"] == pytest.approx(fold["i2t_pmrp"])


# ---------------------------------------------------------------------------- scorers
def embeddings(num_images=10, num_texts=30, dim=8, seed=11):
    g = torch.Generator().manual_seed(seed)
    mean_i = F.normalize(torch.randn(num_images, dim, generator=g), dim=-1)
    mean_t = F.normalize(torch.randn(num_texts, dim, generator=g), dim=-1)
    log_i = torch.randn(num_images, dim, generator=g) - 2
    log_t = torch.randn(num_texts, dim, generator=g) - 2
    text_to_image = torch.randperm(num_texts, generator=g) % num_images
    return mean_i, mean_t, log_i, log_t, text_to_image


def test_cosine_scorer_equals_matrix_of_cosines():
    mean_i, mean_t, _, _, t2i = embeddings()
    result = evaluate_retrieval(image_embeds=mean_i * 3, text_embeds=mean_t, text_to_image=t2i, scorer="cosine")
    assert_same(result, brute_all(mean_i @ mean_t.t(), t2i))


def test_csd_scorer_equals_minus_pairwise_csd():
    mean_i, mean_t, log_i, log_t, t2i = embeddings()
    result = evaluate_retrieval(
        image_embeds=mean_i, text_embeds=mean_t, image_log_sigma2=log_i, text_log_sigma2=log_t,
        text_to_image=t2i, scorer="csd", protocol="coco", fold_size=5,
    )  # fmt: skip
    scores = -pairwise_csd(mean_i, log_i, mean_t, log_t)
    expected = evaluate_retrieval(scores=scores, text_to_image=t2i, protocol="coco", fold_size=5)
    assert result == pytest.approx(expected)
    scorer = build_scorer("csd", image_embeds=mean_i, text_embeds=mean_t, image_log_sigma2=log_i, text_log_sigma2=log_t)
    torch.testing.assert_close(scorer.image_rows(slice(0, 4)), -pairwise_csd(mean_i[:4], log_i[:4], mean_t, log_t))
    torch.testing.assert_close(scorer.text_rows(slice(2, 9)), -pairwise_csd(mean_t[2:9], log_t[2:9], mean_i, log_i))


def test_sampled_scorer_uses_match_log_probability():
    mean_i, mean_t, log_i, log_t, t2i = embeddings(num_images=6, num_texts=12)
    samples_i = sample_gaussian(mean_i, log_i, 3, generator=torch.Generator().manual_seed(0))
    samples_t = sample_gaussian(mean_t, log_t, 3, generator=torch.Generator().manual_seed(1))
    result = evaluate_retrieval(
        image_samples=samples_i, text_samples=samples_t, text_to_image=t2i, scorer="sampled",
        negative_scale=5.0, shift=5.0,
    )  # fmt: skip
    log_p, _ = pairwise_sampled_match_log_prob(samples_i, samples_t, 5.0, 5.0)
    assert_same(result, brute_all(log_p, t2i))
    drawn = evaluate_retrieval(
        image_embeds=mean_i, text_embeds=mean_t, image_log_sigma2=log_i, text_log_sigma2=log_t,
        text_to_image=t2i, scorer="sampled", negative_scale=5.0, shift=5.0, num_samples=3, seed=4,
    )  # fmt: skip
    again = evaluate_retrieval(
        image_embeds=mean_i, text_embeds=mean_t, image_log_sigma2=log_i, text_log_sigma2=log_t,
        text_to_image=t2i, scorer="sampled", negative_scale=5.0, shift=5.0, num_samples=3, seed=4,
    )  # fmt: skip
    assert drawn == again


def test_polysemous_scorer_takes_best_pair():
    g = torch.Generator().manual_seed(12)
    mean_i = F.normalize(torch.randn(5, 2, 6, generator=g), dim=-1)
    mean_t = F.normalize(torch.randn(10, 3, 6, generator=g), dim=-1)
    t2i = torch.arange(5).repeat(2)
    best = torch.einsum("ikd,tld->itkl", mean_i, mean_t).amax(dim=(2, 3))
    result = evaluate_retrieval(image_embeds=mean_i, text_embeds=mean_t, text_to_image=t2i, scorer="polysemous")
    assert_same(result, brute_all(best, t2i))


def test_scorer_registry_names():
    assert set(SCORERS) == {"cosine", "csd", "sampled", "polysemous", "euclidean"}


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text_to_image": [0, 1]}, "text_to_image must give"),
        ({"text_to_image": [0, 1, 7]}, r"\[0, 2\)"),
        ({"text_to_image": [0, 0, 0]}, "no caption"),
        ({"text_to_image": [0, 1, 1], "protocol": "coco", "fold_size": 3}, "fold_size"),
        ({"text_to_image": [0, 1, 1], "ks": ()}, "ks"),
        (
            {"text_to_image": [0, 1, 1], "scorer": "nope", "image_embeds": torch.ones(2, 3),
             "text_embeds": torch.ones(3, 3)},  # fmt: skip
            "valid choices",
        ),
        ({"text_to_image": [0, 1, 1], "positives": "classes"}, "image_classes"),
        ({"text_to_image": [0, 1, 1], "image_labels": torch.full((2, 4), 2.0)}, "multi-hot"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, message):
    kwargs = dict(kwargs)
    if "image_embeds" not in kwargs:
        kwargs["scores"] = torch.rand(2, 3)
    with pytest.raises(ValueError, match=message):
        evaluate_retrieval(**kwargs)


def test_nan_scores_raise():
    scores = torch.rand(2, 3)
    scores[1, 2] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_retrieval(scores=scores, text_to_image=[0, 1, 1])
    mean_i, mean_t, _, _, t2i = embeddings()
    mean_i[3, 0] = math.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        evaluate_retrieval(image_embeds=mean_i, text_embeds=mean_t, text_to_image=t2i)


def test_empty_query_set_raises():
    with pytest.raises(ValueError, match="Empty query set"):
        evaluate_retrieval(scores=torch.zeros(0, 0), text_to_image=[])


def test_no_labelled_query_raises():
    scores, text_to_image, _ = random_case(num_images=4, captions=2)
    with pytest.raises(ValueError, match="No query has a relevant item"):
        evaluate_retrieval(scores=scores, text_to_image=text_to_image, image_labels=torch.zeros(4, 3))


def test_sampled_scorer_needs_scale_and_shift():
    mean_i, mean_t, log_i, log_t, t2i = embeddings()
    with pytest.raises(ValueError, match="negative_scale and shift"):
        evaluate_retrieval(
            image_embeds=mean_i, text_embeds=mean_t, image_log_sigma2=log_i, text_log_sigma2=log_t,
            text_to_image=t2i, scorer="sampled",
        )  # fmt: skip


# ---------------------------------------------------------------------------- the two ranking paths
def test_kernel_ranks_pairs_and_classes_and_torch_ranks_explicit_positives(ranking_path, monkeypatch):
    calls = []
    original = rank_kernel.rank_rows
    monkeypatch.setattr(rank_kernel, "rank_rows", lambda *a, **k: calls.append(1) or original(*a, **k))
    scores, text_to_image, labels = random_case(seed=8)
    evaluate_retrieval(scores=scores, text_to_image=text_to_image, image_labels=labels)
    evaluate_retrieval(scores=scores, text_to_image=text_to_image, image_classes=torch.arange(12) % 3)
    expected = 4 if ranking_path == "kernel" else 0  # one block per direction per call
    assert len(calls) == expected
    # explicit i2t positives have no key form: that direction goes to torch; t2i keeps the pairs
    evaluate_retrieval(scores=scores, text_to_image=text_to_image, positives={"i2t": [[0]] * 12})
    assert len(calls) == expected + (1 if ranking_path == "kernel" else 0)


def test_kernel_and_torch_paths_agree_exactly_at_realistic_size(monkeypatch):
    g = torch.Generator().manual_seed(21)
    text_to_image = torch.arange(300).repeat_interleave(5)
    scores = (torch.randn(300, 1500, generator=g) * 64).round() / 64  # continuous, with some ties
    rates = torch.full((12,), 0.08)
    rates[0] = 0.5
    labels = (torch.rand(300, 12, generator=g) < rates).float()
    kwargs = dict(scores=scores, text_to_image=text_to_image, image_labels=labels, protocol="coco", fold_size=100)
    monkeypatch.setattr(ranking, "USE_KERNEL", True)
    kernel = evaluate_retrieval(**kwargs)
    monkeypatch.setattr(ranking, "USE_KERNEL", False)
    assert kernel == evaluate_retrieval(**kwargs)


@pytest.mark.parametrize("size", [1, 7, 48, 49, 300])
def test_kernel_sort_orders_by_score_then_flag(size):
    rng = np.random.default_rng(size)
    values = rng.integers(0, 5, size).astype(np.float32)  # many ties
    flags = rng.integers(0, 2, size).astype(np.int64)
    order = np.empty(size, np.int64)
    rank_kernel._sort_desc(values, flags, order, size)
    ranked = [(values[i], flags[i]) for i in order]
    assert ranked == sorted(zip(values, flags), key=lambda pair: (-pair[0], pair[1]))
    assert sorted(order.tolist()) == list(range(size))


@pytest.mark.parametrize("seed", range(4))
def test_kernel_kth_largest_equals_sorting(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 200))
    values = rng.integers(0, 6, size).astype(np.float64)  # many duplicates
    expected = sorted(values.tolist(), reverse=True)
    for k in sorted({1, size, int(rng.integers(1, size + 1))}):
        assert rank_kernel._kth_largest(values.copy(), size, k) == expected[k - 1]


@pytest.mark.parametrize("magnitude", [2e38, 1e-44])
def test_extreme_score_ranges_match_bruteforce(magnitude):
    # a float32 spread that overflows (6e38) or a scale that does (subnormal spread): same exact ranks
    scores, text_to_image, labels = random_case(seed=10)
    extreme = ((scores - 1.5) * magnitude).float()  # values in {-1.5, -0.5, 0.5, 1.5} x magnitude
    assert torch.isfinite(extreme).all()
    result = evaluate_retrieval(scores=extreme, text_to_image=text_to_image, image_labels=labels)
    assert_same(result, brute_all(extreme.double(), text_to_image, labels))


def test_large_zeta_is_refused():
    scores, text_to_image, labels = random_case(seed=9)
    with pytest.raises(ValueError, match="at most 100"):
        evaluate_retrieval(scores=scores, text_to_image=text_to_image, image_labels=labels, zetas=(0, 200))
