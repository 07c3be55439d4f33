"""IMRAM: attention and memory units against hand computation, K-step scores, save / reload, re-ranking."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModel, pipeline

from hf_pcme import IMRAMConfig, IMRAMModel, PCMEModel
from hf_pcme.modeling_imram import LocalFeatures, MemoryDistillationUnit, cross_attention
from hf_pcme.rerank import check_rerank_top_k, rerank, rerank_score_matrix
from hf_pcme.testing import TINY_CAPTIONS, tiny_images, tiny_pcme_config, tiny_processor, tiny_text_config
from train_callbacks import KillAfterSteps


@pytest.fixture()
def processor():
    return tiny_processor()


@pytest.fixture()
def dual_encoder(processor):
    torch.manual_seed(0)
    config = tiny_pcme_config(text_config=tiny_text_config(vocab_size=len(processor.tokenizer)))
    return PCMEModel(config).eval()


def _imram(dual_encoder, **kwargs):
    torch.manual_seed(1)
    kwargs.setdefault("embed_dim", 8)
    return IMRAMModel.from_dual_encoder(dual_encoder, **kwargs).eval()


def _features(seed: int, batch: int, length: int, dim: int, mask_lengths=None) -> LocalFeatures:
    generator = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(batch, length, dim, generator=generator), dim=-1)
    mask = None
    if mask_lengths is not None:
        mask = torch.arange(length).unsqueeze(0) < torch.tensor(mask_lengths).unsqueeze(1)
    return LocalFeatures(features, mask)


def test_cross_attention_matches_hand_computation():
    # one pair: two queries, three context vectors (unit length), lambda = 2, LeakyReLU slope 0.1
    query = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])
    context = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    attended, weights = cross_attention(query, context, temperature=2.0, leaky_relu_slope=0.1)
    # cosines s_ij: q1 = (1, 0, -1), q2 = (0.6, 0.8, -0.6); clipped: -1 -> -0.1, -0.6 -> -0.06
    s = [[1.0, 0.0, -0.1], [0.6, 0.8, -0.06]]
    norms = [math.sqrt(s[0][j] ** 2 + s[1][j] ** 2) for j in range(3)]  # over the queries, per context item
    expected_weights = []
    for i in range(2):
        logits = [2.0 * s[i][j] / norms[j] for j in range(3)]
        total = sum(math.exp(v) for v in logits)
        expected_weights.append([math.exp(v) / total for v in logits])
    expected_weights = torch.tensor([expected_weights])
    torch.testing.assert_close(weights, expected_weights)
    expected_attended = expected_weights @ context
    torch.testing.assert_close(attended, expected_attended)


def test_cross_attention_ignores_padding():
    query = _features(0, 1, 3, 4, mask_lengths=[2])
    context = _features(1, 1, 5, 4, mask_lengths=[3])
    attended, weights = cross_attention(query.features, context.features, query_mask=query.mask, context_mask=context.mask)
    short_attended, short_weights = cross_attention(query.features[:, :2], context.features[:, :3])
    assert torch.all(weights[0, :, 3:] == 0)
    torch.testing.assert_close(weights[:, :2, :3], short_weights)
    torch.testing.assert_close(attended[:, :2], short_attended)


def test_memory_update_matches_formula():
    unit = MemoryDistillationUnit(2)
    with torch.no_grad():
        unit.gate.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]))
        unit.gate.bias.copy_(torch.tensor([0.0, -1.0]))
        unit.candidate.weight.copy_(torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.5, 0.0, 0.0, 0.5]]))
        unit.candidate.bias.zero_()
    query, attended = torch.tensor([[0.6, 0.8]]), torch.tensor([[1.0, 0.0]])
    g = [1 / (1 + math.exp(-0.6)), 1 / (1 + math.exp(-(0.0 - 1.0)))]
    o = [math.tanh(1.0), math.tanh(0.5 * 0.6 + 0.5 * 0.0)]
    raw = [g[0] * 0.6 + (1 - g[0]) * o[0], g[1] * 0.8 + (1 - g[1]) * o[1]]
    norm = math.sqrt(raw[0] ** 2 + raw[1] ** 2)
    torch.testing.assert_close(unit(query, attended), torch.tensor([[raw[0] / norm, raw[1] / norm]]))


@pytest.mark.parametrize("variant", ["text", "image", "full"])
def test_score_is_sum_of_k_steps_computed_by_hand(dual_encoder, variant):
    model = _imram(dual_encoder, num_steps=3, variant=variant, attention_temperature=4.0)
    images = _features(2, 2, 4, 8)
    texts = _features(3, 2, 5, 8, mask_lengths=[5, 3])

    def direction(memory, query, query_mask, context, context_mask):
        steps = []
        for _ in range(3):
            attended, _ = cross_attention(query, context, query_mask=query_mask, context_mask=context_mask,
                                          temperature=4.0, leaky_relu_slope=0.1)
            cosine = torch.nn.functional.cosine_similarity(query, attended, dim=-1)
            real = query_mask if query_mask is not None else torch.ones_like(cosine, dtype=torch.bool)
            steps.append(torch.stack([cosine[p][real[p]].mean() for p in range(cosine.shape[0])]))
            query = memory(query, attended)
        return torch.stack(steps, dim=-1)

    with torch.no_grad():
        expected = 0
        if variant in ("text", "full"):
            expected = expected + direction(model.text_memory, texts.features, texts.mask, images.features, None)
        if variant in ("image", "full"):
            expected = expected + direction(model.image_memory, images.features, None, texts.features, texts.mask)
        by_step = model.score_pairs_by_step(images, texts)
        torch.testing.assert_close(by_step, expected)
        torch.testing.assert_close(model.score_pairs(images, texts), expected.sum(-1))
        # every pair of the two sets equals the aligned pairs it is made of
        all_pairs = model.score_all_pairs(images, texts)
        for i in range(2):
            for j in range(2):
                torch.testing.assert_close(all_pairs[i, j], model.score_pairs(images.select([i]), texts.select([j]))[0])


def test_from_dual_encoder_shares_frozen_towers(dual_encoder):
    model = _imram(dual_encoder)
    assert model.vision_model is dual_encoder.vision_model and model.text_model is dual_encoder.text_model
    model.train()
    assert not model.vision_model.training and not model.text_model.training
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"image_projection", "text_projection", "text_memory", "image_memory"}


def test_save_reload_identity(tmp_path, dual_encoder, processor):
    model = _imram(dual_encoder, num_steps=2)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, IMRAMModel) and reloaded.config.num_steps == 2
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    inputs = processor(images=tiny_images(3), text=list(TINY_CAPTIONS), return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**inputs).logits_per_image
        after = reloaded(**inputs).logits_per_image
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_training_loss_is_hardest_negative_triplet(dual_encoder, processor):
    model = _imram(dual_encoder, margin=0.2)
    inputs = processor(images=tiny_images(4), text=list(TINY_CAPTIONS), return_tensors="pt", padding=True)
    output = model(**inputs, return_loss=True)
    scores = output.logits_per_image.detach()
    expected = 0.0
    for i in range(4):  # image queries: hardest negative caption; caption queries: hardest negative image
        expected += max(0.0, 0.2 + max(scores[i, j] for j in range(4) if j != i) - scores[i, i])
        expected += max(0.0, 0.2 + max(scores[j, i] for j in range(4) if j != i) - scores[i, i])
    torch.testing.assert_close(output.loss.detach(), torch.tensor(float(expected)))
    output.loss.backward()
    assert model.text_memory.gate.weight.grad is not None
    assert all(p.grad is None for p in model.vision_model.parameters())


def test_rerank_matrix_puts_top_k_first_in_reranker_order():
    first = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7]])
    candidates = first.topk(3, dim=1).indices  # items 0, 4, 2
    scores = rerank_score_matrix(first, candidates, torch.tensor([[-5.0, 2.0, 1.0]]))
    assert scores[0].argsort(descending=True).tolist() == [4, 2, 0, 3, 1]


def test_rerank_with_k_at_least_gallery_equals_full_scoring(dual_encoder):
    model = _imram(dual_encoder)
    images, texts = _features(4, 6, 4, 8), _features(5, 7, 5, 8, mask_lengths=[5, 4, 3, 5, 2, 5, 1])
    with torch.no_grad():
        full = model.score_all_pairs(images, texts)
    first_stage = torch.randn(6, 7, generator=torch.Generator().manual_seed(0))
    from hf_pcme.rerank import candidate_scores

    for k in (7, 50):
        i2t = rerank(first_stage, k, lambda c: candidate_scores(model, images, texts, c, True))
        assert torch.equal(i2t.argsort(dim=1, descending=True), full.argsort(dim=1, descending=True))
        t2i = rerank(first_stage.t(), k, lambda c: candidate_scores(model, images, texts, c, False))
        assert torch.equal(t2i.argsort(dim=1, descending=True), full.t().argsort(dim=1, descending=True))


def test_pipeline_reranks_and_keeps_first_stage_fields(dual_encoder, processor):
    model = _imram(dual_encoder)
    plain = pipeline("cross-modal-retrieval", model=dual_encoder, processor=processor)
    reranking = pipeline("cross-modal-retrieval", model=dual_encoder, processor=processor, reranker=model, rerank_top_k=4)
    corpus = list(TINY_CAPTIONS)
    image = tiny_images(1)[0]
    first = plain(images=image, corpus=corpus, top_k=4, progress_bar=False)["results"]
    second = reranking(images=image, corpus=corpus, top_k=2, progress_bar=False)["results"]
    assert len(second) == 2
    by_id = {item["id"]: item for item in first}
    inputs = processor(images=[image], text=corpus, return_tensors="pt", padding=True)
    with torch.no_grad():
        imram_scores = model(**inputs).logits_per_image[0]
    assert [item["id"] for item in second] == imram_scores.argsort(descending=True)[:2].tolist()
    for item in second:
        assert item["score"] == pytest.approx(by_id[item["id"]]["score"], abs=1e-5)
        assert item["match_probability"] == pytest.approx(by_id[item["id"]]["match_probability"], rel=1e-4)
        assert item["uncertainty"] == pytest.approx(by_id[item["id"]]["uncertainty"])
        assert item["rerank_score"] == pytest.approx(float(imram_scores[item["id"]]), abs=1e-5)
        assert first[item["first_stage_rank"]]["id"] == item["id"]


def test_bad_reranker_and_top_k_are_clear_errors(dual_encoder, processor):
    model = _imram(dual_encoder)
    with pytest.raises(ValueError, match="rerank_top_k \\(2\\) is smaller than top_k \\(3\\)"):
        reranking = pipeline("cross-modal-retrieval", model=dual_encoder, processor=processor, reranker=model)
        reranking(texts="a red circle", corpus=tiny_images(4), top_k=3, rerank_top_k=2, progress_bar=False)
    with pytest.raises(ValueError, match="positive integer"):
        check_rerank_top_k(0)
    other = IMRAMModel(IMRAMConfig(vision_config=dual_encoder.config.vision_config,
                                   text_config=tiny_text_config(vocab_size=999), embed_dim=8))
    with pytest.raises(ValueError, match="towers do not fit the model: its text_config differs in vocab_size"):
        pipeline("cross-modal-retrieval", model=dual_encoder, processor=processor, reranker=other)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="variant"):
        IMRAMConfig(variant="both")
    with pytest.raises(ValueError, match="num_steps"):
        IMRAMConfig(num_steps=0)


def test_unfrozen_tower_is_a_copy(dual_encoder):
    model = _imram(dual_encoder, frozen_towers=["vision"])
    assert model.vision_model is dual_encoder.vision_model
    assert model.text_model is not dual_encoder.text_model
    for a, b in zip(model.text_model.parameters(), dual_encoder.text_model.parameters()):
        assert torch.equal(a, b) and a.requires_grad
    with torch.no_grad():
        next(model.text_model.parameters()).add_(1.0)
    assert not torch.equal(next(model.text_model.parameters()), next(dual_encoder.text_model.parameters()))


def test_training_module_scores_the_batch_with_same_image_positives(dual_encoder, processor):
    from hf_pcme.training.module_imram import IMRAMTrainingModule

    model = _imram(dual_encoder)
    module = IMRAMTrainingModule(model)
    inputs = processor(images=tiny_images(4), text=list(TINY_CAPTIONS), return_tensors="pt", padding=True)
    image_ids = torch.tensor([0, 0, 1, 2])  # pairs 0 and 1 show the same image
    output = module(**inputs, image_ids=image_ids)
    scores = model(**inputs).logits_per_image.detach()
    positives = image_ids[:, None] == image_ids[None, :]
    expected = 0.0
    for i in range(4):
        for p in range(4):
            if positives[i, p]:
                expected += max(0.0, 0.2 + scores[i][~positives[i]].max() - scores[i, p])
                expected += max(0.0, 0.2 + scores[:, i][~positives[:, i]].max() - scores[p, i])
    torch.testing.assert_close(output.loss.detach(), torch.tensor(float(expected)), rtol=1e-5, atol=1e-5)


def test_evaluate_script_with_reranker_covering_the_gallery_ranks_by_imram(tmp_path, dual_encoder, processor):
    import importlib.util
    from pathlib import Path

    import numpy as np

    from hf_pcme.data import load_dataset_by_name, make_retrieval_split

    repo = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("evaluate_script", repo / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    options = {"num_images": 8, "num_eval_images": 6, "image_size": 32, "cache_dir": tmp_path / "cache"}
    view = make_retrieval_split(load_dataset_by_name("shapes", split="test", **options))
    shapes_processor = tiny_processor(texts=list(view.captions["caption"]))
    config = tiny_pcme_config(text_config=tiny_text_config(vocab_size=len(shapes_processor.tokenizer)))
    torch.manual_seed(0)
    model_dir, reranker_dir = tmp_path / "pcme", tmp_path / "imram"
    pcme = PCMEModel(config).eval()
    pcme.save_pretrained(model_dir)
    shapes_processor.save_pretrained(model_dir)
    reranker = _imram(pcme)
    reranker.save_pretrained(reranker_dir)
    args = ["--model", str(model_dir), "--dataset", "shapes", "--scorer", "cosine", "--output", str(tmp_path / "r.json"),
            *[f"--dataset-option={key}={value}" for key, value in options.items()]]

    metrics = script.main([*args, "--reranker", str(reranker_dir), "--rerank-top-k", str(view.num_captions)])
    inputs = shapes_processor(images=[row["image"] for row in view.images], text=list(view.captions["caption"]),
                              return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = reranker(**inputs).logits_per_image
    own = torch.as_tensor(view.text_to_image)[None, :] == torch.arange(view.num_images)[:, None]
    # pessimistic ties (as the metrics): a hit only if the best relevant item beats every other item
    # (identical vague captions of different images tie exactly)
    i2t_hits = [int(scores[i][own[i]].max() > scores[i][~own[i]].max()) for i in range(view.num_images)]
    t2i_hits = [int(scores[:, j][own[:, j]].max() > scores[:, j][~own[:, j]].max()) for j in range(view.num_captions)]
    assert metrics["i2t_R@1"] == pytest.approx(100.0 * np.mean(i2t_hits))
    assert metrics["t2i_R@1"] == pytest.approx(100.0 * np.mean(t2i_hits))

    with pytest.raises(ValueError, match="must be an IMRAM model"):
        script.main([*args, "--reranker", str(model_dir)])


@pytest.mark.parametrize("loss_overrides", [[], [  # + negatives mined by the dual encoder, hardest after a warm-up
    "model.imram.mined_negatives=2", "model.imram.mining_top_k=3", "model.imram.max_violation=true",
    "model.imram.hardest_negative_warmup_steps=2", "model.imram.duplicate_caption_positives=true"]], ids=["in_batch", "mined"])
def test_imram_recipe_trains_through_the_trainer_and_resumes_exactly(tmp_path, loss_overrides):
    from pathlib import Path

    from hf_pcme.training.config import load_recipe
    from hf_pcme.training.trainer import train

    repo = Path(__file__).resolve().parent.parent
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = [f"data.options={{num_images: 8, num_eval_images: 4, image_size: 32, cache_dir: {tmp_path / 'cache'}}}",
                "data.image_size=32", "train.batch_size=8"]
        pcme_dir = tmp_path / "pcme"
        train(load_recipe(repo / "configs/shapes_pcme.yaml", [
            "model.vision_config={model_type: resnet, embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1], "
            "layer_type: basic, downsample_in_first_stage: false}",
            "model.text_config={model_type: pcme_bigru, word_dim: 8, hidden_size: 16}", "model.embed_dim=8",
            "model.num_samples=3", "train.max_steps=1", "eval.enabled=false", f"output_dir={pcme_dir}", *data]))
        imram = [f"model.pretrained={pcme_dir}", "model.imram.embed_dim=8", "train.phase2_steps=4", "train.warmup_steps=1",
                 "train.checkpoint_every=2", "train.log_every=1", *data, *loss_overrides]
        recipe = repo / "configs/shapes_imram.yaml"
        whole = train(load_recipe(recipe, [*imram, f"output_dir={tmp_path / 'whole'}"]))
        assert isinstance(whole.model, IMRAMModel) and whole.global_step == 4
        stopped = train(load_recipe(recipe, [*imram, f"output_dir={tmp_path / 'resumed'}"]), callbacks=[KillAfterSteps(2)])
        assert stopped.interrupted
        resumed = train(load_recipe(recipe, [*imram, f"output_dir={tmp_path / 'resumed'}"]), resume=True)
    finally:
        torch.set_num_threads(threads)
    saved = IMRAMModel.from_pretrained(tmp_path / "resumed")
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
        assert torch.equal(value, saved.state_dict()[name]), name
    frozen = PCMEModel.from_pretrained(pcme_dir).vision_model.state_dict()
    assert all(torch.equal(v, saved.vision_model.state_dict()[k]) for k, v in frozen.items())  # the vision tower stayed fixed
    assert (tmp_path / "resumed" / "README.md").read_text().count("IMRAM re-ranker") == 1


def test_imram_loading_refuses_corrupt_weights_and_a_folder_without_config(tmp_path, dual_encoder):
    # the re-ranker loads through the same strict from_pretrained as PCMEModel
    _imram(dual_encoder).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(OSError, match="corrupt or truncated"):
        IMRAMModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        IMRAMModel.from_pretrained(tmp_path)
