"""CrossModalIndex: exact search (torch and FAISS), CSD through augmented vectors, persistence, errors.

Every expected ranking is computed here by brute force from the formulas of docs/formulas.md:
cosine = mu_q . mu_t / (|mu_q| |mu_t|); CSD d = ||mu_v - mu_t||^2 + sum sigma_v^2 + sum sigma_t^2.
"""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_pcme import index as index_module
from hf_pcme import index_backends
from hf_pcme.index import (
    CrossModalIndex,
    item_search_vectors,
    model_fingerprint,
    query_search_vectors,
)

faiss = pytest.importorskip("faiss")

BACKENDS = ["torch", "faiss"]


def random_gaussians(num: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mean = F.normalize(torch.randn(num, dim, generator=generator), dim=-1)
    # log variances spread over two decades, so the variance term changes the ranking
    log_sigma2 = torch.rand(num, dim, generator=generator) * 4.6 - 7.0
    return mean, log_sigma2


def brute_force_csd(query_mean, query_log_sigma2, item_mean, item_log_sigma2) -> torch.Tensor:
    """d(v, t) = ||mu_v - mu_t||^2 + sum sigma_v^2 + sum sigma_t^2, one pair at a time (float64)."""
    out = torch.empty(query_mean.shape[0], item_mean.shape[0], dtype=torch.float64)
    for i in range(query_mean.shape[0]):
        for j in range(item_mean.shape[0]):
            diff = query_mean[i].double() - item_mean[j].double()
            out[i, j] = (
                diff.pow(2).sum() + query_log_sigma2[i].double().exp().sum() + item_log_sigma2[j].double().exp().sum()
            )
    return out


def brute_force_best_pair_cosine(query_mean: torch.Tensor, item_mean: torch.Tensor) -> torch.Tensor:
    """max over the K x K pairs of cos(q_i, t_j), one item at a time."""
    q = query_mean if query_mean.dim() == 3 else query_mean.unsqueeze(1)
    t = item_mean if item_mean.dim() == 3 else item_mean.unsqueeze(1)
    out = torch.empty(q.shape[0], t.shape[0], dtype=torch.float64)
    for i in range(q.shape[0]):
        for j in range(t.shape[0]):
            out[i, j] = max(
                F.cosine_similarity(a.double(), b.double(), dim=0).item() for a in q[i] for b in t[j]
            )
    return out


# ---------------------------------------------------------------------------- exact search
@pytest.mark.parametrize("backend", BACKENDS)
def test_csd_topk_equals_bruteforce_ids_and_distances(backend):
    item_mean, item_log_sigma2 = random_gaussians(300, 12, seed=0)
    query_mean, query_log_sigma2 = random_gaussians(6, 12, seed=1)
    index = CrossModalIndex.from_embeddings(
        item_mean, item_log_sigma2, metric="csd", backend=backend, chunk_size=37  # 9 uneven chunks
    )
    result = index.search(query_mean, query_log_sigma2, top_k=10)

    expected = brute_force_csd(query_mean, query_log_sigma2, item_mean, item_log_sigma2)
    expected_distances, expected_ids = expected.topk(10, dim=1, largest=False)
    assert torch.equal(result.indices, expected_ids)
    torch.testing.assert_close(result.distances.double(), expected_distances, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.scores, -result.distances)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_topk_equals_bruteforce(backend):
    generator = torch.Generator().manual_seed(2)
    item_mean = torch.randn(250, 10, generator=generator) * 3.0  # not normalised: the index normalises
    query_mean = torch.randn(5, 10, generator=generator)
    index = CrossModalIndex.from_embeddings(item_mean, metric="cosine", backend=backend, chunk_size=64)
    result = index.search(query_mean, top_k=7)

    expected_scores, expected_ids = brute_force_best_pair_cosine(query_mean, item_mean).topk(7, dim=1)
    assert torch.equal(result.indices, expected_ids)
    torch.testing.assert_close(result.scores.double(), expected_scores, rtol=1e-5, atol=1e-5)
    assert result.distances is None


def test_torch_search_chunks_queries_too(monkeypatch):
    monkeypatch.setattr(index_backends, "QUERY_CHUNK_ROWS", 3)
    item_mean, item_log_sigma2 = random_gaussians(80, 8, seed=3)
    query_mean, query_log_sigma2 = random_gaussians(10, 8, seed=4)
    index = CrossModalIndex.from_embeddings(item_mean, item_log_sigma2, metric="csd", chunk_size=13)
    result = index.search(query_mean, query_log_sigma2, top_k=4)

    expected = brute_force_csd(query_mean, query_log_sigma2, item_mean, item_log_sigma2)
    expected_ids = expected.topk(4, largest=False).indices
    assert torch.equal(result.indices, expected_ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_polysemous_items_rank_by_best_of_k_by_k_pairs(backend):
    generator = torch.Generator().manual_seed(5)
    item_mean = F.normalize(torch.randn(60, 3, 8, generator=generator), dim=-1)
    query_mean = F.normalize(torch.randn(4, 2, 8, generator=generator), dim=-1)
    index = CrossModalIndex.from_embeddings(item_mean, metric="cosine", backend=backend, chunk_size=7)
    result = index.search(query_mean, top_k=6)

    expected_scores, expected_ids = brute_force_best_pair_cosine(query_mean, item_mean).topk(6, dim=1)
    assert torch.equal(result.indices, expected_ids)
    torch.testing.assert_close(result.scores.double(), expected_scores, rtol=1e-5, atol=1e-5)


def test_csd_of_point_embeddings_is_squared_euclidean():
    generator = torch.Generator().manual_seed(6)
    item_mean = torch.randn(40, 5, generator=generator)
    query_mean = torch.randn(3, 5, generator=generator)
    result = CrossModalIndex.from_embeddings(item_mean, metric="csd").search(query_mean, top_k=3)

    by_hand = torch.tensor([[((q - t) ** 2).sum().item() for t in item_mean] for q in query_mean])
    expected_distances, expected_ids = by_hand.topk(3, dim=1, largest=False)
    assert torch.equal(result.indices, expected_ids)
    torch.testing.assert_close(result.distances, expected_distances, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_building_in_blocks_changes_nothing(monkeypatch, backend):
    monkeypatch.setattr(index_module, "BUILD_CHUNK_ROWS", 7)
    item_mean, item_log_sigma2 = random_gaussians(50, 6, seed=18)
    query_mean, query_log_sigma2 = random_gaussians(3, 6, seed=19)
    index = CrossModalIndex.from_embeddings(item_mean, item_log_sigma2, metric="csd", backend=backend)
    result = index.search(query_mean, query_log_sigma2, top_k=50)

    expected = brute_force_csd(query_mean, query_log_sigma2, item_mean, item_log_sigma2).sort(dim=1)
    assert torch.equal(result.indices, expected.indices)  # the full ranking: every block was filled
    torch.testing.assert_close(result.distances.double(), expected.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(index.uncertainty, item_log_sigma2.exp().mean(-1))


def test_augmented_inner_product_is_minus_csd_plus_query_constant():
    item_mean, item_log_sigma2 = random_gaussians(5, 4, seed=7)
    query_mean, query_log_sigma2 = random_gaussians(3, 4, seed=8)
    items = item_search_vectors(item_mean, item_log_sigma2, "csd").squeeze(1)
    queries, offsets = query_search_vectors(query_mean, query_log_sigma2, "csd")

    csd = brute_force_csd(query_mean, query_log_sigma2, item_mean, item_log_sigma2)
    c_v = query_mean.double().pow(2).sum(-1) + query_log_sigma2.double().exp().sum(-1)  # |mu_v|^2 + sum sigma_v^2
    assert items.shape == (5, 5) and queries.shape == (3, 1, 5)
    torch.testing.assert_close((queries.squeeze(1) @ items.t()).double(), -csd + c_v[:, None], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(offsets.squeeze(1).double(), c_v, rtol=1e-6, atol=1e-6)


def test_ivf_with_every_cell_probed_is_exact():
    item_mean, item_log_sigma2 = random_gaussians(400, 8, seed=9)
    query_mean, query_log_sigma2 = random_gaussians(5, 8, seed=10)
    index = CrossModalIndex.from_embeddings(
        item_mean, item_log_sigma2, metric="csd", backend="faiss", faiss_index_type="ivf", nlist=8, nprobe=8
    )
    result = index.search(query_mean, query_log_sigma2, top_k=5)

    expected = brute_force_csd(query_mean, query_log_sigma2, item_mean, item_log_sigma2)
    expected_ids = expected.topk(5, largest=False).indices
    assert torch.equal(result.indices, expected_ids)
    assert index.nlist == 8


# ---------------------------------------------------------------------------- stored items
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "csd"])
def test_item_embeddings_give_back_the_indexed_means(backend, metric):
    item_mean, item_log_sigma2 = random_gaussians(20, 6, seed=11)
    index = CrossModalIndex.from_embeddings(item_mean, item_log_sigma2, metric=metric, backend=backend)
    picked = index.item_embeddings(torch.tensor([[3, 17], [0, 3]]))

    torch.testing.assert_close(picked.mean, item_mean[[3, 17, 0, 3]])  # means are unit vectors already
    torch.testing.assert_close(picked.log_sigma2, item_log_sigma2[[3, 17, 0, 3]])


def test_uncertainty_is_mean_variance_per_item():
    item_mean, item_log_sigma2 = random_gaussians(4, 3, seed=12)
    index = CrossModalIndex.from_embeddings(item_mean, item_log_sigma2)
    by_hand = torch.tensor([sum(v.exp().item() for v in row) / 3 for row in item_log_sigma2])
    torch.testing.assert_close(index.uncertainty, by_hand)
    assert CrossModalIndex.from_embeddings(item_mean).uncertainty is None


# ---------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("saved_backend", BACKENDS)
@pytest.mark.parametrize("loaded_backend", BACKENDS)
def test_save_load_roundtrip_gives_same_results(tmp_path, saved_backend, loaded_backend):
    item_mean, item_log_sigma2 = random_gaussians(50, 6, seed=13)
    query_mean, query_log_sigma2 = random_gaussians(4, 6, seed=14)
    ids = [f"caption-{i}" for i in range(50)]
    texts = [f"a caption number {i}" for i in range(50)]
    index = CrossModalIndex.from_embeddings(
        item_mean, item_log_sigma2, ids=ids, texts=texts, metric="csd", backend=saved_backend, model_fingerprint="fp-1"
    )
    index.save(tmp_path / "index")
    loaded = CrossModalIndex.load(tmp_path / "index", backend=loaded_backend)

    assert loaded.backend == loaded_backend
    assert (loaded.ids, loaded.texts, loaded.metric, loaded.modality) == (ids, texts, "csd", "text")
    assert loaded.model_fingerprint == "fp-1" and len(loaded) == 50 and loaded.embed_dim == 6
    torch.testing.assert_close(loaded.mean, item_mean)
    torch.testing.assert_close(loaded.log_sigma2, item_log_sigma2)
    before = index.search(query_mean, query_log_sigma2, top_k=5)
    after = loaded.search(query_mean, query_log_sigma2, top_k=5)
    assert torch.equal(before.indices, after.indices)
    torch.testing.assert_close(before.distances, after.distances)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_index_is_json_safetensors_and_faiss_only(tmp_path, backend):
    item_mean, item_log_sigma2 = random_gaussians(10, 4, seed=15)
    attention = torch.softmax(torch.randn(10, 1, 9), dim=-1)
    index = CrossModalIndex.from_embeddings(
        item_mean, item_log_sigma2, attention=attention, modality="image", metric="csd", backend=backend
    )
    directory = index.save(tmp_path / "index")

    expected = {"index_config.json", "ids.json", "embeddings.safetensors"}
    expected |= {"index.faiss"} if backend == "faiss" else set()
    assert {p.name for p in directory.iterdir()} == expected
    assert json.loads((directory / "index_config.json").read_text())["metric"] == "csd"
    torch.testing.assert_close(CrossModalIndex.load(directory).attention, attention)


def test_ivf_nprobe_survives_save_load(tmp_path):
    item_mean, _ = random_gaussians(200, 4, seed=16)
    index = CrossModalIndex.from_embeddings(item_mean, backend="faiss", faiss_index_type="ivf", nlist=10, nprobe=3)
    index.save(tmp_path / "ivf")
    loaded = CrossModalIndex.load(tmp_path / "ivf")
    assert (loaded.faiss_index_type, loaded.nlist, loaded.nprobe) == ("ivf", 10, 3)
    assert faiss.extract_index_ivf(loaded._faiss_index).nprobe == 3


# ---------------------------------------------------------------------------- model identity
def tiny_model(seed: int, embed_dim: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Module()
    model.config = types.SimpleNamespace(head_type="probabilistic", embed_dim=embed_dim, num_embeds=1)
    model.image_head = nn.Linear(3, embed_dim)
    model.text_head = nn.Linear(3, embed_dim)
    model.vision_model = nn.Linear(2, 3)
    return model


def test_fingerprint_depends_on_head_weights_only():
    first, same, other = tiny_model(0), tiny_model(0), tiny_model(1)
    assert model_fingerprint(first) == model_fingerprint(same)
    assert model_fingerprint(first) != model_fingerprint(other)
    with torch.no_grad():
        same.text_head.weight[0, 0] += 1e-3
    assert model_fingerprint(first) != model_fingerprint(same)
    assert model_fingerprint(first).startswith("probabilistic-K1-D4-")


def test_check_compatible_rejects_other_model_and_embedding_size():
    index = CrossModalIndex.from_embeddings(torch.randn(3, 4), model_fingerprint="model-a")
    index.check_compatible("model-a", 4)
    with pytest.raises(ValueError, match="different model"):
        index.check_compatible("model-b", 4)
    with pytest.raises(ValueError, match="4-d embeddings but the model makes 8-d"):
        index.check_compatible("model-a", 8)


# ---------------------------------------------------------------------------- bad input
def test_empty_corpus_is_rejected():
    with pytest.raises(ValueError, match="corpus is empty"):
        CrossModalIndex.from_embeddings(torch.empty(0, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_larger_than_corpus_is_rejected(backend):
    index = CrossModalIndex.from_embeddings(torch.randn(3, 4), backend=backend)
    with pytest.raises(ValueError, match="top_k=4 is larger than the corpus \\(3 items\\)"):
        index.search(torch.randn(1, 4), top_k=4)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        index.search(torch.randn(1, 4), top_k=0)


def test_query_of_another_embedding_size_is_rejected():
    index = CrossModalIndex.from_embeddings(torch.randn(3, 4))
    with pytest.raises(ValueError, match="query_mean must be \\(Q, 4\\)"):
        index.search(torch.randn(1, 8), top_k=1)


def test_csd_needs_variances_on_both_sides():
    item_mean, item_log_sigma2 = random_gaussians(5, 4, seed=17)
    index = CrossModalIndex.from_embeddings(item_mean, item_log_sigma2, metric="csd")
    with pytest.raises(ValueError, match="index has variances but the queries do not"):
        index.search(item_mean[:1], top_k=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metric": "dot"}, "Unknown metric 'dot'"),
        ({"backend": "annoy"}, "Unknown backend 'annoy'"),
        ({"ids": [1, 2]}, "ids must have one entry per item \\(3\\)"),
        ({"ids": [1, 2, 3.5]}, "ids must be str or int"),
        ({"texts": ["a"]}, "texts must have one entry per item"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CrossModalIndex.from_embeddings(torch.randn(3, 4), **kwargs)


def test_faiss_backend_without_faiss_says_how_to_install(monkeypatch):
    monkeypatch.setattr(index_backends, "faiss", None)
    with pytest.raises(ImportError, match=r"pip install hf_pcme\[faiss\]"):
        CrossModalIndex.from_embeddings(torch.randn(3, 4), backend="faiss")
    # the torch back end does not need it
    assert len(CrossModalIndex.from_embeddings(torch.randn(3, 4), backend="torch")) == 3


def test_search_ignores_autocast():
    item_mean, item_log_sigma2 = random_gaussians(64, 16, seed=20)
    query_mean, query_log_sigma2 = random_gaussians(2, 16, seed=21)
    index = CrossModalIndex.from_embeddings(item_mean, item_log_sigma2, metric="csd")
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        result = index.search(query_mean, query_log_sigma2, top_k=64)
    expected = brute_force_csd(query_mean, query_log_sigma2, item_mean, item_log_sigma2).sort(dim=1)
    assert torch.equal(result.indices, expected.indices)
    torch.testing.assert_close(result.distances.double(), expected.values, rtol=1e-5, atol=1e-5)
