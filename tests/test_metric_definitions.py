"""The plain metric definitions (hf_pcme.metrics.definitions) by hand, and the fast paths against them."""

import numpy as np
import pytest
import torch

from hf_pcme.metrics import definitions, evaluate_retrieval, rank_block, ranking
from hf_pcme.metrics.rank_types import PlausibilityLevels, RelevanceView


# ---------------------------------------------------------------------------- by hand
def test_definitions_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    relevant = np.array([False, True, False, True, True, False])
    # ranks of the relevant items: 2, 4, 5; R = 3
    assert definitions.recall_at_k(scores, relevant, 1) == 0.0
    assert definitions.recall_at_k(scores, relevant, 2) == 1.0
    assert definitions.r_precision(scores, relevant) == pytest.approx(1 / 3)  # top 3 holds one
    assert definitions.map_at_r(scores, relevant) == pytest.approx((1 / 2) / 3)  # P(2) = 1/2, only hit in top 3
    assert definitions.recall_at_k(scores, np.zeros(6, bool), 5) is None


def test_ties_rank_irrelevant_items_first():
    scores = np.array([1.0, 1.0, 1.0, 0.0])
    relevant = np.array([True, False, False, False])
    # the relevant item shares the top score with two irrelevant ones: rank 3
    assert definitions.recall_at_k(scores, relevant, 2) == 0.0
    assert definitions.recall_at_k(scores, relevant, 3) == 1.0
    assert definitions.r_precision(scores, relevant) == 0.0


def test_pmrp_ranks_only_the_considered_items():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    plausible = np.array([False, True, True, False])
    considered = np.array([False, True, True, True])  # the best item has no labels: left out
    assert definitions.pmrp(scores, plausible) == pytest.approx(1 / 2)
    assert definitions.pmrp(scores, plausible, considered) == pytest.approx(1.0)
    labels = np.array([[1, 0, 1], [1, 0, 0], [0, 1, 1]])
    assert definitions.plausible_by_labels(labels[0], labels, 1).tolist() == [True, True, False]


# ---------------------------------------------------------------------------- rank_block against them
def _block_case(seed: int, rows: int = 7, items: int = 40, levels: int = 5):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (rows, items), generator=g).float()  # many ties
    item_keys = torch.randint(0, 4, (items,), generator=g)
    query_keys = torch.randint(0, 4, (rows,), generator=g)
    plausibility = torch.randint(0, 5, (rows, items), generator=g)  # 0..2 = Hamming, 3 = far, 4 = unlabelled
    return scores, item_keys, query_keys, plausibility


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_rank_block_equals_definitions(use_kernel, seed, monkeypatch):
    monkeypatch.setattr(ranking, "USE_KERNEL", use_kernel)
    scores, item_keys, query_keys, levels = _block_case(seed)
    relevant = item_keys.unsqueeze(0) == query_keys.unsqueeze(1)
    view = RelevanceView(relevant.sum(1), lambda r, c: item_keys[c] == query_keys[r], (item_keys, query_keys))
    max_zeta, zetas, ks = 2, (0, 1, 2), (1, 3)
    plausible = PlausibilityLevels(levels.to(torch.int8), 1, max_zeta, torch.ones(scores.shape[0], dtype=torch.bool))
    ranks, _ = rank_block(scores, ks=ks, relevance={"pairs": view}, plausibility=plausible, zetas=zetas)
    for row in range(scores.shape[0]):
        s, rel = scores[row].numpy(), relevant[row].numpy()
        if not rel.any():
            assert not ranks.valid["pairs"][row]
            continue
        for column, k in enumerate(ks):
            assert bool(ranks.recall_hits["pairs"][row, column]) == bool(definitions.recall_at_k(s, rel, k))
        assert float(ranks.r_precision["pairs"][row]) == pytest.approx(definitions.r_precision(s, rel), abs=1e-12)
        assert float(ranks.ap_at_r["pairs"][row]) == pytest.approx(definitions.map_at_r(s, rel), abs=1e-12)
        level = levels[row].numpy()
        for column, zeta in enumerate(zetas):
            expected = definitions.pmrp(s, level <= zeta, considered=level <= max_zeta + 1)
            assert bool(ranks.pmrp_valid[row, column]) == (expected is not None)
            if expected is not None:
                assert float(ranks.pmrp[row, column]) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_evaluate_retrieval_equals_reference_metrics(use_kernel, monkeypatch):
    monkeypatch.setattr(ranking, "USE_KERNEL", use_kernel)
    g = torch.Generator().manual_seed(3)
    text_to_image = torch.arange(10).repeat_interleave(3)[torch.randperm(30, generator=g)]
    scores = torch.randint(0, 4, (10, 30), generator=g).float()
    labels = (torch.rand(10, 5, generator=g) < 0.4).float()
    labels[2] = 0
    result = evaluate_retrieval(scores=scores, text_to_image=text_to_image, image_labels=labels)
    expected = definitions.reference_metrics(scores.numpy(), text_to_image.numpy(), labels.numpy())
    assert set(expected) <= set(result)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key


# ---------------------------------------------------------------------------- the PMRP level table
@pytest.mark.parametrize("categories", [3, 64, 130])  # one word, exactly one, three words
def test_level_table_equals_hamming_by_loops(categories):
    from hf_pcme.metrics import level_kernel

    g = torch.Generator().manual_seed(categories)
    labels = (torch.rand(30, categories, generator=g) < 0.3).float()
    labels[4] = 0  # an image without labels
    labelled = labels.sum(1) > 0
    max_zeta = 2
    table = level_kernel.levels_table(labels, labelled, max_zeta)
    for i in range(30):
        for j in range(30):
            hamming = int((labels[i] != labels[j]).sum())
            expected = min(hamming, max_zeta + 1) if labelled[j] else max_zeta + 2
            assert int(table[i, j]) == expected, (i, j)
