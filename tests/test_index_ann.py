"""Approximate CrossModalIndex types (FAISS IVF-Flat, IVF-PQ, HNSW) with exact re-scoring.

Expected rankings and distances are brute force, from the CSD formula of docs/formulas.md:
d(v, t) = ||mu_v - mu_t||^2 + sum sigma_v^2 + sum sigma_t^2.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hf_pcme.index import AnnOptions, CrossModalIndex

faiss = pytest.importorskip("faiss")

APPROXIMATE = ["ivf", "ivf_pq", "hnsw"]


def random_gaussians(num: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mean = F.normalize(torch.randn(num, dim, generator=generator), dim=-1)
    log_sigma2 = torch.rand(num, dim, generator=generator) * 4.6 - 7.0
    return mean, log_sigma2


def brute_force_csd(query_mean, query_log_sigma2, item_mean, item_log_sigma2) -> torch.Tensor:
    """d(v, t) one pair at a time, float64."""
    out = torch.empty(query_mean.shape[0], item_mean.shape[0], dtype=torch.float64)
    for i in range(query_mean.shape[0]):
        for j in range(item_mean.shape[0]):
            diff = query_mean[i].double() - item_mean[j].double()
            out[i, j] = (
                diff.pow(2).sum() + query_log_sigma2[i].double().exp().sum() + item_log_sigma2[j].double().exp().sum()
            )
    return out


def exhaustive(index_type: str, item_mean, item_log_sigma2, **options) -> CrossModalIndex:
    """An approximate index asked to look everywhere: every IVF cell probed, an HNSW beam as large as the corpus."""
    num_items = item_mean.shape[0]
    return CrossModalIndex.from_embeddings(
        item_mean, item_log_sigma2, metric="csd", backend="faiss", faiss_index_type=index_type,
        nlist=8, nprobe=8, ann_options=AnnOptions(ef_search=num_items, **options),
    )  # fmt: skip


@pytest.mark.parametrize("index_type", APPROXIMATE)
def test_exhaustive_approximate_search_equals_exact_search(index_type):
    item_mean, item_log_sigma2 = random_gaussians(400, 16, seed=0)
    query_mean, query_log_sigma2 = random_gaussians(6, 16, seed=1)
    # IVF-PQ's codes are lossy: every item is a candidate (candidate_factor * k >= N), re-scored exactly.
    options = {"pq_m": 4, "pq_bits": 6, "candidate_factor": 40} if index_type == "ivf_pq" else {}
    index = exhaustive(index_type, item_mean, item_log_sigma2, **options)
    result = index.search(query_mean, query_log_sigma2, top_k=10)

    expected = brute_force_csd(query_mean, query_log_sigma2, item_mean, item_log_sigma2).topk(10, largest=False)
    assert torch.equal(result.indices, expected.indices)
    torch.testing.assert_close(result.distances.double(), expected.values, rtol=1e-5, atol=1e-5)


def test_ivf_pq_candidates_are_rescored_with_the_exact_csd():
    item_mean, item_log_sigma2 = random_gaussians(500, 16, seed=2)
    query_mean, query_log_sigma2 = random_gaussians(8, 16, seed=3)
    index = CrossModalIndex.from_embeddings(
        item_mean, item_log_sigma2, metric="csd", backend="faiss", faiss_index_type="ivf_pq",
        nlist=4, nprobe=2, ann_options=AnnOptions(pq_m=2, pq_bits=4, candidate_factor=2),
    )  # fmt: skip
    result = index.search(query_mean, query_log_sigma2, top_k=5)

    csd = brute_force_csd(query_mean, query_log_sigma2, item_mean, item_log_sigma2)
    # Coarse 2-byte codes: the candidates are approximate, but each returned distance is the exact CSD
    # of the returned item, best first; a PQ-estimated score would differ by far more than 1e-5.
    torch.testing.assert_close(result.distances.double(), csd.gather(1, result.indices), rtol=1e-5, atol=1e-5)
    assert torch.all(result.distances[:, 1:] >= result.distances[:, :-1])
    exact_ids = csd.topk(5, largest=False).indices
    assert not torch.equal(result.indices, exact_ids)  # the codes are coarse enough to miss some


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_polysemous_items_rank_by_best_pair_in_approximate_search(index_type):
    generator = torch.Generator().manual_seed(4)
    item_mean = F.normalize(torch.randn(80, 3, 8, generator=generator), dim=-1)
    query_mean = F.normalize(torch.randn(4, 2, 8, generator=generator), dim=-1)
    index = CrossModalIndex.from_embeddings(
        item_mean, metric="cosine", backend="faiss", faiss_index_type=index_type, nlist=6, nprobe=6,
        ann_options=AnnOptions(ef_search=240),
    )  # fmt: skip
    result = index.search(query_mean, top_k=6)

    cosines = torch.einsum("qad,ibd->qiab", query_mean.double(), item_mean.double()).amax(dim=(2, 3))
    expected = cosines.topk(6, dim=1)
    assert torch.equal(result.indices, expected.indices)
    torch.testing.assert_close(result.scores.double(), expected.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index_type", APPROXIMATE)
def test_save_load_roundtrip_is_identical(tmp_path, index_type):
    item_mean, item_log_sigma2 = random_gaussians(300, 16, seed=5)
    query_mean, query_log_sigma2 = random_gaussians(5, 16, seed=6)
    index = CrossModalIndex.from_embeddings(
        item_mean, item_log_sigma2, metric="csd", backend="faiss", faiss_index_type=index_type, nlist=10,
        nprobe=2, ann_options=AnnOptions(pq_m=4, pq_bits=5, ef_search=12, candidate_factor=3),
    )  # fmt: skip
    directory = index.save(tmp_path / index_type)
    loaded = CrossModalIndex.load(directory)

    assert (loaded.faiss_index_type, loaded.nprobe, loaded.ann_options) == (index_type, 2, index.ann_options)
    before = index.search(query_mean, query_log_sigma2, top_k=5)
    after = loaded.search(query_mean, query_log_sigma2, top_k=5)
    assert torch.equal(before.indices, after.indices)
    assert torch.equal(before.distances, after.distances)
    torch.testing.assert_close(loaded.mean, item_mean)
    saved = json.loads((directory / "index_config.json").read_text())
    assert saved["ann"]["ef_search"] == 12 and saved["faiss_index_type"] == index_type
    expected_files = {"index_config.json", "ids.json", "embeddings.safetensors", "index.faiss"}
    assert {p.name for p in directory.iterdir()} == expected_files


def test_nprobe_and_ef_search_are_settable_after_loading(tmp_path):
    item_mean, item_log_sigma2 = random_gaussians(300, 8, seed=7)
    query_mean, query_log_sigma2 = random_gaussians(5, 8, seed=8)
    CrossModalIndex.from_embeddings(
        item_mean, item_log_sigma2, metric="csd", backend="faiss", faiss_index_type="ivf", nlist=12, nprobe=1
    ).save(tmp_path / "ivf")
    loaded = CrossModalIndex.load(tmp_path / "ivf", nprobe=3)
    assert faiss.extract_index_ivf(loaded._faiss_index).nprobe == 3
    loaded.nprobe = 12  # every cell: exact
    assert faiss.extract_index_ivf(loaded._faiss_index).nprobe == 12
    expected = brute_force_csd(query_mean, query_log_sigma2, item_mean, item_log_sigma2).topk(5, largest=False)
    assert torch.equal(loaded.search(query_mean, query_log_sigma2, top_k=5).indices, expected.indices)

    hnsw = CrossModalIndex.from_embeddings(item_mean, backend="faiss", faiss_index_type="hnsw")
    hnsw.save(tmp_path / "hnsw")
    loaded = CrossModalIndex.load(tmp_path / "hnsw", ef_search=77)
    assert loaded.ef_search == 77 and faiss.downcast_index(loaded._faiss_index).hnsw.efSearch == 77
    loaded.ef_search = 150
    assert faiss.downcast_index(loaded._faiss_index).hnsw.efSearch == 150


def test_approximate_index_loads_into_the_exact_torch_backend(tmp_path):
    item_mean, item_log_sigma2 = random_gaussians(200, 8, seed=9)
    CrossModalIndex.from_embeddings(
        item_mean, item_log_sigma2, metric="csd", backend="faiss", faiss_index_type="ivf_pq", nlist=4,
        ann_options=AnnOptions(pq_bits=4),
    ).save(tmp_path / "pq")  # fmt: skip
    loaded = CrossModalIndex.load(tmp_path / "pq", backend="torch")
    assert loaded.backend == "torch"
    torch.testing.assert_close(loaded.mean, item_mean)  # the exact means, not the PQ codes


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"faiss_index_type": "ivf", "nlist": 31}, "nlist=31 is larger than the number of vectors \\(30\\)"),
        ({"faiss_index_type": "ivf", "nlist": 0}, "nlist must be an integer >= 1"),
        ({"faiss_index_type": "ivf_pq", "nlist": 2, "ann_options": AnnOptions(pq_m=5)}, "pq_m=5 does not divide"),
        ({"faiss_index_type": "ivf_pq", "nlist": 2, "ann_options": AnnOptions(pq_bits=6)}, "pq_bits=6 means 64"),
        ({"faiss_index_type": "annoy"}, "Unknown faiss_index_type 'annoy'"),
        ({"faiss_index_type": "hnsw", "nprobe": 0}, "nprobe must be >= 1"),
    ],
)
def test_bad_options_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CrossModalIndex.from_embeddings(torch.randn(30, 8), backend="faiss", **kwargs)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"pq_bits": 17}, "pq_bits must be between 1 and 16"),
        ({"hnsw_m": 1}, "hnsw_m must be an integer >= 2"),
        ({"ef_search": 0}, "ef_search must be an integer >= 1"),
        ({"candidate_factor": 0}, "candidate_factor must be an integer >= 1"),
    ],
)
def test_bad_ann_options_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        AnnOptions(**options)
    index = CrossModalIndex.from_embeddings(torch.randn(30, 8), backend="faiss", faiss_index_type="hnsw")
    name = next(iter(options))
    if name in ("ef_search", "candidate_factor"):
        with pytest.raises(ValueError, match=message):
            setattr(index, name, options[name])


@pytest.mark.parametrize("index_type", APPROXIMATE)
@pytest.mark.parametrize("metric", ["cosine", "csd"])
def test_stored_means_come_back_from_the_approximate_index(index_type, metric):
    item_mean, item_log_sigma2 = random_gaussians(64, 8, seed=10)
    index = CrossModalIndex.from_embeddings(
        item_mean, item_log_sigma2, metric=metric, backend="faiss", faiss_index_type=index_type, nlist=4,
        ann_options=AnnOptions(pq_bits=4),
    )  # fmt: skip
    picked = index.item_embeddings(torch.tensor([5, 0, 63]))
    torch.testing.assert_close(picked.mean, item_mean[[5, 0, 63]])  # unit means: cosine keeps them too
    torch.testing.assert_close(picked.log_sigma2, item_log_sigma2[[5, 0, 63]])


def test_ivf_index_saved_before_the_approximate_types_loads_and_searches_as_before(tmp_path):
    """An ``"ivf"`` index saved by the earlier code: FAISS inner-product IVF over the CSD item vectors, no ``ann``."""
    from safetensors.torch import save_file

    from hf_pcme.index import item_search_vectors

    item_mean, item_log_sigma2 = random_gaussians(120, 8, seed=11)
    query_mean, query_log_sigma2 = random_gaussians(4, 8, seed=12)
    vectors = item_search_vectors(item_mean, item_log_sigma2, "csd").reshape(120, 9).numpy()
    old = faiss.IndexIVFFlat(faiss.IndexFlatIP(9), 9, 6, faiss.METRIC_INNER_PRODUCT)
    old.train(vectors)
    old.make_direct_map()
    old.add(vectors)
    directory = tmp_path / "old_ivf"
    directory.mkdir()
    faiss.write_index(old, str(directory / "index.faiss"))
    save_file({"log_sigma2": item_log_sigma2.contiguous()}, str(directory / "embeddings.safetensors"))
    config = {
        "format_version": 1, "num_items": 120, "embed_dim": 8, "num_embeds": 1, "modality": "text", "metric": "csd",
        "backend": "faiss", "faiss_index_type": "ivf", "nlist": 6, "nprobe": 6, "model_fingerprint": None,
    }  # fmt: skip
    (directory / "index_config.json").write_text(json.dumps(config))
    (directory / "ids.json").write_text(json.dumps({"ids": list(range(120)), "texts": None}))

    loaded = CrossModalIndex.load(directory)
    result = loaded.search(query_mean, query_log_sigma2, top_k=5)
    expected = brute_force_csd(query_mean, query_log_sigma2, item_mean, item_log_sigma2).topk(5, largest=False)
    assert torch.equal(result.indices, expected.indices)
    torch.testing.assert_close(result.distances.double(), expected.values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.mean, item_mean)
