"""The graph-convolutional text tower (dual-path GCN): word graph, GCN layer, word vectors, save / load."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_pcme import PCMEModel, PCMETextGCNConfig, PCMETextGCNModel
from hf_pcme.testing import TINY_CAPTIONS, tiny_images, tiny_pcme_config, tiny_processor
from hf_pcme.text_gcn import GraphConvolution, adjacency_from_neighbors, knn_word_graph, normalized_adjacency
from hf_pcme.training.word_vectors import caption_words, initialise_text_gcn, load_word_vector_file, train_word2vec


def gcn_text_config(vocab_size: int, **overrides):
    config = {"model_type": "pcme_textgcn", "vocab_size": vocab_size, "word_dim": 8, "hidden_size": 16,
              "num_neighbors": 3, "word2vec_epochs": 5}
    config.update(overrides)
    return config


def dense_normalized(adjacency: torch.Tensor) -> torch.Tensor:
    """D^-1/2 (A + I) D^-1/2 with dense matrices (the formula as written)."""
    with_loops = adjacency + torch.eye(adjacency.shape[0])
    inv_sqrt = torch.diag(with_loops.sum(1).rsqrt())
    return inv_sqrt @ with_loops @ inv_sqrt


# ---------------------------------------------------------------------------------------- graph
def test_word_graph_of_a_tiny_vocabulary_equals_the_hand_computed_one():
    # word 0 = padding (no vector); cosines: s12 = 1/sqrt(1.25), s23 = 0.5/sqrt(1.25), s34 = 0, s14 = -1
    vectors = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.5], [0.0, 1.0], [-1.0, 0.0]])
    ids, weights = knn_word_graph(vectors, num_neighbors=1, similarity_threshold=0.0)
    s12, s23 = 1 / math.sqrt(1.25), 0.5 / math.sqrt(1.25)
    # kNN(1) = 2, kNN(2) = 1, kNN(3) = 2, kNN(4): best is word 3 at cosine 0, not > threshold: none
    assert ids[1:4, 0].tolist() == [2, 1, 2]
    torch.testing.assert_close(weights[:, 0], torch.tensor([0.0, s12, s12, s23, 0.0]))
    expected_a = torch.zeros(5, 5)
    expected_a[1, 2] = expected_a[2, 1] = s12
    expected_a[2, 3] = expected_a[3, 2] = s23
    adjacency = adjacency_from_neighbors(ids, weights)
    torch.testing.assert_close(adjacency.to_dense(), expected_a)
    # by hand: degrees of A + I are 1, 1 + s12, 1 + s12 + s23, 1 + s23, 1
    degree = [1.0, 1 + s12, 1 + s12 + s23, 1 + s23, 1.0]
    expected = torch.zeros(5, 5)
    for i in range(5):
        for j in range(5):
            entry = expected_a[i, j].item() + (1.0 if i == j else 0.0)
            expected[i, j] = entry / math.sqrt(degree[i] * degree[j])
    torch.testing.assert_close(normalized_adjacency(adjacency).to_dense(), expected)


def test_threshold_removes_weak_edges_and_k_limits_neighbours():
    vectors = torch.tensor([[1.0, 0.0], [1.0, 0.2], [1.0, 0.9], [0.9, 1.0]])
    ids, weights = knn_word_graph(vectors, num_neighbors=2, similarity_threshold=0.9)
    unit = torch.nn.functional.normalize(vectors, dim=1)
    similarity = unit @ unit.t()
    for i in range(4):
        others = sorted((j for j in range(4) if j != i), key=lambda j: -similarity[i, j].item())[:2]
        expected = [j for j in others if similarity[i, j] > 0.9]
        got = [int(j) for j, w in zip(ids[i], weights[i]) if w != 0]
        assert got == expected, i


def test_gcn_layer_matches_the_dense_matrix_formula():
    torch.manual_seed(0)
    vectors = torch.randn(7, 4)
    ids, weights = knn_word_graph(vectors, num_neighbors=2, similarity_threshold=-1.0)
    adjacency = adjacency_from_neighbors(ids, weights)
    layer = GraphConvolution(5, 3)
    hidden = torch.randn(2, 7, 5)
    expected = torch.relu(dense_normalized(adjacency.to_dense()) @ hidden @ layer.weight)
    torch.testing.assert_close(layer(normalized_adjacency(adjacency), hidden), expected)


def test_tower_is_two_gcn_layers_over_the_bag_of_words_then_pooled():
    config = PCMETextGCNConfig(vocab_size=6, word_dim=3, hidden_size=4, num_neighbors=2, similarity_threshold=-1.0)
    tower = PCMETextGCNModel(config).eval()
    torch.manual_seed(1)
    vectors = torch.randn(6, 3)
    vectors[0] = 0  # padding
    tower.set_word_vectors(vectors)
    input_ids = torch.tensor([[2, 3, 2, 0], [5, 1, 0, 0]])
    mask = (input_ids != 0).long()
    out = tower(input_ids, mask)
    a_hat = dense_normalized(adjacency_from_neighbors(tower.neighbor_ids, tower.neighbor_weights).to_dense())
    for b in range(2):
        counts = torch.zeros(6)
        for token, keep in zip(input_ids[b], mask[b]):
            if keep:
                counts[token] += 1
        x = counts.unsqueeze(1) * vectors  # bag of words on the graph: count * word vector at each node
        h2 = torch.relu(a_hat @ torch.relu(a_hat @ x @ tower.layer1.weight) @ tower.layer2.weight)
        reached = (a_hat @ a_hat @ counts) > 0
        torch.testing.assert_close(out.pooler_output[b], h2[reached].amax(0))
        for position, token in enumerate(input_ids[b]):
            expected = h2[token] if mask[b, position] else torch.zeros(4)
            torch.testing.assert_close(out.last_hidden_state[b, position], expected)


# ---------------------------------------------------------------------------------------- word vectors
def test_word2vec_vectors_are_deterministic_and_cover_the_caption_words():
    processor = tiny_processor()
    sentences = caption_words(processor.tokenizer, TINY_CAPTIONS)
    vocab = processor.tokenizer.get_vocab()
    first = train_word2vec(sentences, vocab, word_dim=8, epochs=3, seed=0)
    second = train_word2vec(sentences, vocab, word_dim=8, epochs=3, seed=0)
    assert torch.equal(first, second)
    covered = {word for word, index in vocab.items() if first[index].abs().sum() > 0}
    assert covered == {word for sentence in sentences for word in sentence}


def test_word2vec_text_file_is_read_for_the_vocabulary(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("2 3\nred 1 2 3\ncircle 0.5 0 -1\n", encoding="utf-8")
    vocab = {"[PAD]": 0, "[UNK]": 1, "red": 2, "circle": 3, "blue": 4}
    vectors = load_word_vector_file(path, vocab, word_dim=3)
    expected = torch.zeros(5, 3)
    expected[2] = torch.tensor([1.0, 2.0, 3.0])
    expected[3] = torch.tensor([0.5, 0.0, -1.0])
    assert torch.equal(vectors, expected)


def test_a_vocabulary_without_vectors_is_a_clear_error(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("1 3\nzebra 1 2 3\n", encoding="utf-8")
    vocab = {"[PAD]": 0, "[UNK]": 1, "red": 2}
    with pytest.raises(ValueError, match="model.word_embeddings"):
        load_word_vector_file(path, vocab, word_dim=3)
    with pytest.raises(ValueError, match="text_config.word_dim"):
        load_word_vector_file(path, vocab, word_dim=4)
    tower = PCMETextGCNModel(PCMETextGCNConfig(vocab_size=3, word_dim=3, hidden_size=4))
    with pytest.raises(ValueError, match="word vector"):
        tower.set_word_vectors(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="set_word_vectors"):
        tower(torch.tensor([[2]]))


@pytest.mark.parametrize("option, value", [("num_neighbors", 0), ("similarity_threshold", 1.5), ("pooling", "sum")])
def test_bad_config_names_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        PCMETextGCNConfig(**{option: value})


def test_builders_train_word2vec_from_the_training_captions():
    from hf_pcme.training.builders import build_model, needs_training_captions
    from hf_pcme.training.config import recipe_from_dict

    processor = tiny_processor()
    recipe = recipe_from_dict({"model": {
        "vision_config": tiny_pcme_config().vision_config.to_dict(),
        "text_config": {"model_type": "pcme_textgcn", "word_dim": 8, "hidden_size": 16, "word2vec_epochs": 2},
        "embed_dim": 8, "head_type": "deterministic", "loss_type": "pairwise_similarity",
    }})
    assert needs_training_captions(recipe)
    model = build_model(recipe, processor.tokenizer, TINY_CAPTIONS)
    expected = initialise_text_gcn(PCMETextGCNModel(model.text_model.config), processor.tokenizer, TINY_CAPTIONS)
    assert int((model.text_model.word_vectors.abs().sum(1) > 0).sum()) == expected


# ---------------------------------------------------------------------------------------- save / load
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("textgcn")
    processor = tiny_processor()
    torch.manual_seed(0)
    config = tiny_pcme_config(text_config=gcn_text_config(len(processor.tokenizer)), head_type="deterministic",
                              loss_type="pairwise_similarity")
    model = PCMEModel(config).eval()
    initialise_text_gcn(model.text_model, processor.tokenizer, TINY_CAPTIONS)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


def test_graph_and_vectors_round_trip_through_safetensors(saved):
    folder, model, processor = saved
    reloaded = PCMEModel.from_pretrained(folder).eval()
    assert isinstance(reloaded.text_model, PCMETextGCNModel)
    for name in ("word_vectors", "neighbor_ids", "neighbor_weights"):
        assert torch.equal(getattr(reloaded.text_model, name), getattr(model.text_model, name)), name
    inputs = processor(images=tiny_images(4), text=list(TINY_CAPTIONS))
    torch.testing.assert_close(reloaded(**inputs).logits_per_image, model(**inputs).logits_per_image)


def test_remote_code_model_and_pipeline_work_without_the_package(saved):
    folder, model, processor = saved
    from transformers import pipeline

    from hf_pcme.pipeline_cross_modal_retrieval import TASK

    images = tiny_images(3)
    image_path = folder.parent / "query.png"
    images[1].save(image_path)
    local = pipeline(TASK, model=model, processor=processor, device="cpu", progress_bar=False)
    expected = local(images=str(image_path), corpus=list(TINY_CAPTIONS), top_k=3)
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["hf_pcme"] = None  # only the folder's code may be used
        from transformers import AutoModel, pipeline
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model.text_model).__module__.startswith("transformers_modules"), type(model.text_model)
        retriever = pipeline({TASK!r}, model={str(folder)!r}, trust_remote_code=True, device="cpu")
        out = retriever(images={str(image_path)!r}, corpus={list(TINY_CAPTIONS)!r}, top_k=3, progress_bar=False)
        print(json.dumps(out))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(folder.parent / "modules"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["id"] for r in remote["results"]] == [r["id"] for r in expected["results"]]
    for got, want in zip(remote["results"], expected["results"]):
        assert got["score"] == pytest.approx(want["score"], rel=1e-5)


# ---------------------------------------------------------------------------------------- pairwise loss
@pytest.mark.parametrize("num_embeds", [1, 2])
def test_pairwise_similarity_loss_matches_a_loop_over_pairs(num_embeds):
    from hf_pcme import ProbabilisticEmbedding
    from hf_pcme.losses import build_loss

    torch.manual_seed(3)
    image = torch.nn.functional.normalize(torch.randn(4, num_embeds, 5), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, num_embeds, 5), dim=-1)
    mask = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    loss = build_loss("pairwise_similarity", margin=0.7, margin_weight=0.5, var_weight=2.0)
    squeeze = (lambda x: x.squeeze(1)) if num_embeds == 1 else (lambda x: x)
    out = loss(ProbabilisticEmbedding(mean=squeeze(image)), ProbabilisticEmbedding(mean=squeeze(text)), mask)
    positives, negatives = [], []
    for i in range(4):
        for j in range(3):
            s = max(float(image[i, k] @ text[j, m]) for k in range(num_embeds) for m in range(num_embeds))
            (positives if mask[i, j] else negatives).append(s)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    var = lambda v: sum((x - mean(v)) ** 2 for x in v) / len(v)  # noqa: E731
    expected = 2.0 * (var(positives) + var(negatives)) + 0.5 * max(0.0, 0.7 - (mean(positives) - mean(negatives)))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_freezing_word_embeddings_of_the_gcn_is_a_clear_error():
    from hf_pcme.training.optim import freeze_towers

    processor = tiny_processor()
    model = PCMEModel(tiny_pcme_config(text_config=gcn_text_config(len(processor.tokenizer)), head_type="deterministic",
                                       loss_type="pairwise_similarity"))
    with pytest.raises(ValueError, match="phase1_frozen"):
        freeze_towers(model, ["word_embeddings"])


def test_textgcn_recipe_trains_and_saves_a_self_contained_model(tmp_path):
    from pathlib import Path

    from hf_pcme.training.config import load_recipe
    from hf_pcme.training.trainer import train

    repo = Path(__file__).resolve().parents[1]
    recipe = load_recipe(repo / "configs" / "shapes_textgcn.yaml", [
        "model.vision_config={model_type: resnet, embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1], "
        "layer_type: basic, downsample_in_first_stage: false}",
        "model.text_config={model_type: pcme_textgcn, word_dim: 8, hidden_size: 16, num_neighbors: 3, word2vec_epochs: 2}",
        "model.embed_dim=8", "data.image_size=32", "train.batch_size=8", "train.phase2_steps=2",
        "train.warmup_steps=0", "train.eval_every=0", "eval.enabled=false", "logging=jsonl",
        f"data.options={{num_images: 8, num_eval_images: 4, image_size: 32, cache_dir: {tmp_path / 'cache'}}}",
        f"output_dir={tmp_path / 'run'}",
    ])
    result = train(recipe)
    reloaded = PCMEModel.from_pretrained(tmp_path / "run")
    assert isinstance(reloaded.text_model, PCMETextGCNModel)
    assert torch.equal(reloaded.text_model.word_vectors, result.model.text_model.word_vectors)
    assert reloaded.text_model.neighbor_weights.abs().sum() > 0
