"""IMRAM training with dual-encoder-mined negatives, duplicate-aware positives, and score fusion at re-ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_pcme import IMRAMModel, PCMEModel
from hf_pcme.modeling_imram import LocalFeatures
from hf_pcme.rerank import fuse_scores, rerank
from hf_pcme.testing import TINY_CAPTIONS, tiny_images, tiny_pcme_config, tiny_processor, tiny_text_config
from hf_pcme.training.mining_imram import (
    MinedNegatives,
    caption_text_ids,
    duplicate_aware_positives,
    mine_negatives,
    normalise_caption,
)
from hf_pcme.training.module_imram import IMRAMTrainingModule


@pytest.fixture()
def processor():
    return tiny_processor()


@pytest.fixture()
def dual_encoder(processor):
    torch.manual_seed(0)
    config = tiny_pcme_config(text_config=tiny_text_config(vocab_size=len(processor.tokenizer)))
    return PCMEModel(config).eval()


def test_caption_duplicates_ignore_case_spacing_and_final_period():
    assert normalise_caption("  Some  shapes. ") == "some shapes"
    ids = caption_text_ids(["Some shapes.", "a red circle", "some shapes", "A red  circle ."])
    assert ids[0] == ids[2] and ids[1] == ids[3] and ids[0] != ids[1]


def test_duplicate_aware_positives_include_identical_captions_of_other_images():
    text_to_image = np.array([0, 0, 1, 1, 2])
    text_ids = np.array([7, 3, 7, 4, 5])  # captions 0 and 2 ("some shapes") are identical
    positives = duplicate_aware_positives(text_to_image, text_ids, num_images=3)
    expected = torch.zeros(3, 5, dtype=torch.bool)
    for image in range(3):
        own_texts = {text_ids[c] for c in range(5) if text_to_image[c] == image}
        for caption in range(5):
            expected[image, caption] = bool(text_ids[caption] in own_texts)
    assert torch.equal(positives, expected)
    assert positives[1, 0] and positives[0, 2] and not positives[2, 0]


def test_mined_negatives_are_dual_encoder_top_k_minus_positives():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 15, generator=generator)
    text_to_image = np.repeat(np.arange(6), [3, 3, 2, 3, 2, 2])
    text_ids = np.array([0, 1, 2, 3, 0, 5, 6, 7, 8, 1, 10, 11, 12, 0, 14])  # some shared texts
    positives = duplicate_aware_positives(text_to_image, text_ids, 6)
    image_to_captions, caption_to_images = mine_negatives(scores, positives, top_k=4)
    for image in range(6):  # brute force: best first, skipping positives
        ranked = sorted(range(15), key=lambda c: -float(scores[image, c]))
        assert image_to_captions[image].tolist() == [c for c in ranked if not positives[image, c]][:4]
    for caption in range(15):
        ranked = sorted(range(6), key=lambda i: -float(scores[i, caption]))
        negatives = [i for i in ranked if not positives[i, caption]][:4]
        assert caption_to_images[caption].tolist() == negatives + [-1] * (4 - len(negatives))
    assert (caption_to_images[0] == -1).sum() == 1  # "text 0" belongs to 3 of the 6 images: 3 negatives only


def test_fusion_is_weighted_sum_of_row_z_scores():
    first = torch.tensor([[0.9, 0.5, 0.1], [3.0, 2.0, 1.0]])
    second = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 6.0]])
    fused = fuse_scores(first, second, 0.25)
    for row in range(2):
        a, b = first[row].tolist(), second[row].tolist()
        za = [(v - sum(a) / 3) / math.sqrt(sum((x - sum(a) / 3) ** 2 for x in a) / 3) for v in a]
        zb = [(v - sum(b) / 3) / math.sqrt(sum((x - sum(b) / 3) ** 2 for x in b) / 3) for v in b]
        torch.testing.assert_close(fused[row], torch.tensor([0.75 * x + 0.25 * y for x, y in zip(za, zb)]))
    assert torch.equal(fuse_scores(first, second, 1.0), second)  # alpha = 1: the re-ranker alone
    assert fuse_scores(first, second, 0.0).argsort(dim=1, descending=True).tolist() == [[0, 1, 2], [0, 1, 2]]
    with pytest.raises(ValueError, match="fusion_weight must be in \\[0, 1\\]"):
        fuse_scores(first, second, 1.5)


def test_fusion_leaves_missing_candidates_out():
    first = torch.tensor([[2.0, 1.0, -math.inf]])
    fused = fuse_scores(first, torch.tensor([[0.0, 1.0, 5.0]]), 0.5)
    torch.testing.assert_close(fused[0, :2], torch.tensor([0.0, 0.0]))  # z = (+1, -1) and (-1, +1)
    assert fused[0, 2] == -math.inf


def test_rerank_orders_top_k_by_fused_score():
    first = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.7]])
    imram = torch.tensor([[0.0, 9.0, 3.0, 9.0, 1.0]])  # scores of every item; only the top-3 are asked for
    reranked = rerank(first, 3, lambda c: imram.gather(1, c), fusion_weight=0.5)
    candidates = [0, 4, 2]
    fused = fuse_scores(first[:, candidates], imram[:, candidates], 0.5)[0]
    expected = [candidates[i] for i in fused.argsort(descending=True).tolist()] + [3, 1]
    assert reranked[0].argsort(descending=True).tolist() == expected


def _features(generator: torch.Generator, batch: int, length: int, dim: int) -> torch.Tensor:
    return torch.randn(batch, length, dim, generator=generator)


def test_training_loss_with_mined_negatives_matches_brute_force(dual_encoder, processor):
    torch.manual_seed(1)
    model = IMRAMModel.from_dual_encoder(dual_encoder, frozen_towers=["vision"], embed_dim=8, mined_negatives=2,
                                         mining_top_k=2, max_violation=True, hardest_negative_warmup_steps=1).eval()
    captions = list(TINY_CAPTIONS)
    inputs = processor(images=tiny_images(4), text=captions, return_tensors="pt", padding=True)
    with torch.no_grad():
        regions = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state.flatten(2).transpose(1, 2)
    # the "training split": the 4 batch images + 2 more (their regions), the batch captions + 3 more
    generator = torch.Generator().manual_seed(3)
    all_regions = torch.cat([regions, _features(generator, 2, regions.shape[1], regions.shape[2])])
    extra = processor(text=captions[:3], return_tensors="pt", padding="max_length", max_length=inputs["input_ids"].shape[1])
    all_ids = torch.cat([inputs["input_ids"], extra["input_ids"]])
    all_mask = torch.cat([inputs["attention_mask"], extra["attention_mask"]])
    image_to_captions = torch.tensor([[4, 5], [6, 4], [5, 6], [4, 6]])  # caption rows per image row (0..3 in batch)
    caption_to_images = torch.tensor([[4, 5], [5, 4], [4, 0], [5, 1], [0, 1], [2, 3], [1, 2]])
    negatives = MinedNegatives(
        image_ids=np.array([10, 11, 12, 13, 14, 15]), image_rows=np.arange(6),
        caption_ids=np.arange(100, 107), caption_rows=np.arange(7),
        image_to_captions=image_to_captions, caption_to_images=caption_to_images,
        region_features=all_regions, input_ids=all_ids, attention_mask=all_mask,
    )
    module = IMRAMTrainingModule(model, negatives=negatives).train()
    batch = dict(**inputs, image_ids=torch.tensor([10, 11, 12, 13]), caption_ids=torch.tensor([100, 101, 102, 103]))

    with torch.no_grad():
        image_features = model.encode_images(inputs["pixel_values"])
        all_texts = model.encode_texts(all_ids, all_mask)
        projected = LocalFeatures(torch.nn.functional.normalize(model.image_projection(all_regions), dim=-1), None)
        in_batch = model.score_all_pairs(image_features, model.encode_texts(inputs["input_ids"], inputs["attention_mask"]))
        with_captions = model.score_all_pairs(image_features, all_texts)  # (4, 7)
        with_images = model.score_all_pairs(projected, model.encode_texts(inputs["input_ids"], inputs["attention_mask"]))

    def expected_loss(hardest: bool) -> float:
        total = 0.0
        reduce = max if hardest else sum
        for q in range(4):  # image q: in-batch captions j != q and its mined captions
            negatives_i2t = [in_batch[q, j] for j in range(4) if j != q] + [with_captions[q, c] for c in image_to_captions[q]]
            total += float(reduce(max(0.0, 0.2 + s - in_batch[q, q]) for s in negatives_i2t))
            negatives_t2i = [in_batch[i, q] for i in range(4) if i != q] + [with_images[i, q] for i in caption_to_images[q]]
            total += float(reduce(max(0.0, 0.2 + s - in_batch[q, q]) for s in negatives_t2i))
        return total

    first = module(**batch)  # step 0 < warm-up (1): sum over negatives
    assert float(module.steps_seen) == 1
    torch.testing.assert_close(first.loss.detach(), torch.tensor(expected_loss(False)), rtol=1e-4, atol=1e-4)
    second = module(**batch)  # then the hardest negative
    torch.testing.assert_close(second.loss.detach(), torch.tensor(expected_loss(True)), rtol=1e-4, atol=1e-4)
    second.loss.backward()
    assert model.text_projection.weight.grad is not None and model.image_projection.weight.grad is not None


def test_duplicate_caption_positives_in_the_batch(dual_encoder, processor):
    torch.manual_seed(1)
    model = IMRAMModel.from_dual_encoder(dual_encoder, embed_dim=8, duplicate_caption_positives=True).eval()
    captions = ["a red circle", "some shapes", "a blue square", "some shapes"]
    inputs = processor(images=tiny_images(4), text=captions, return_tensors="pt", padding=True)
    output = IMRAMTrainingModule(model)(**inputs, image_ids=torch.tensor([0, 1, 2, 3]))
    with torch.no_grad():
        scores = model(**inputs).logits_per_image
    positives = torch.eye(4, dtype=torch.bool)
    positives[1, 3] = positives[3, 1] = True  # the same text: a positive of both images
    expected = 0.0
    for i in range(4):
        for p in range(4):
            if positives[i, p]:
                expected += max(0.0, 0.2 + scores[i][~positives[i]].max() - scores[i, p])
                expected += max(0.0, 0.2 + scores[:, i][~positives[:, i]].max() - scores[p, i])
    torch.testing.assert_close(output.loss.detach(), torch.tensor(float(expected)), rtol=1e-5, atol=1e-5)


def test_mining_config_errors():
    from hf_pcme import IMRAMConfig

    with pytest.raises(ValueError, match="mining_top_k \\(2\\) must be >= max\\(1, mined_negatives\\) \\(4\\)"):
        IMRAMConfig(mined_negatives=4, mining_top_k=2)
    with pytest.raises(ValueError, match="fusion_weight"):
        IMRAMConfig(fusion_weight=-0.1)
    with pytest.raises(ValueError, match="mined_negatives > 0 but no negatives were mined"):
        IMRAMTrainingModule(IMRAMModel(IMRAMConfig(
            vision_config=tiny_pcme_config().vision_config, text_config=tiny_text_config(), embed_dim=8, mined_negatives=1)))


def test_pipeline_orders_by_fused_score(dual_encoder, processor):
    from transformers import pipeline

    torch.manual_seed(1)
    model = IMRAMModel.from_dual_encoder(dual_encoder, embed_dim=8, fusion_weight=0.5).eval()
    plain = pipeline("cross-modal-retrieval", model=dual_encoder, processor=processor)
    reranking = pipeline("cross-modal-retrieval", model=dual_encoder, processor=processor, reranker=model, rerank_top_k=4)
    corpus, image = list(TINY_CAPTIONS), tiny_images(1)[0]
    first = plain(images=image, corpus=corpus, top_k=4, progress_bar=False)["results"]
    second = reranking(images=image, corpus=corpus, top_k=4, progress_bar=False)["results"]
    by_id = {item["id"]: item for item in second}
    ids = [item["id"] for item in first]
    first_scores = torch.tensor([[item["score"] for item in first]])
    imram_scores = torch.tensor([[by_id[i]["rerank_score"] for i in ids]])
    fused = fuse_scores(first_scores, imram_scores, 0.5)[0]
    assert [item["id"] for item in second] == [ids[i] for i in fused.argsort(descending=True).tolist()]


def test_select_fusion_weight_takes_the_best_r1_sum(tmp_path, dual_encoder):
    from hf_pcme.data import load_dataset_by_name, make_retrieval_split
    from hf_pcme.rerank_evaluation import metrics_from_matrices, reranked_matrices, select_fusion_weight

    view = make_retrieval_split(load_dataset_by_name(
        "shapes", split="val", num_images=8, num_eval_images=6, image_size=32, cache_dir=tmp_path / "cache"))
    torch.manual_seed(1)
    model = IMRAMModel.from_dual_encoder(dual_encoder, embed_dim=8).eval()
    generator = torch.Generator().manual_seed(0)
    images = LocalFeatures(torch.nn.functional.normalize(torch.randn(view.num_images, 4, 8, generator=generator), dim=-1))
    texts = LocalFeatures(torch.nn.functional.normalize(torch.randn(view.num_captions, 3, 8, generator=generator), dim=-1))
    first = torch.randn(view.num_images, view.num_captions, generator=generator)
    weight, rows = select_fusion_weight(first, model, images, texts, view, rerank_top_k=5, grid=(0.0, 0.5, 1.0))
    assert [row["fusion_weight"] for row in rows] == [0.0, 0.5, 1.0]
    alone = metrics_from_matrices(view, first, first)
    assert rows[0]["i2t_R@1"] == alone["i2t_R@1"] and rows[0]["t2i_R@1"] == alone["t2i_R@1"]  # alpha 0: first stage
    for row in rows[1:]:
        i2t, t2i = reranked_matrices(first, model, images, texts, 5, fusion_weight=row["fusion_weight"])
        expected = metrics_from_matrices(view, i2t, t2i)
        assert row["i2t_R@1"] == expected["i2t_R@1"] and row["t2i_R@1"] == expected["t2i_R@1"]
    best = max(row["i2t_R@1"] + row["t2i_R@1"] for row in rows)
    assert weight == min(row["fusion_weight"] for row in rows if row["i2t_R@1"] + row["t2i_R@1"] == best)


def test_choose_fusion_weight_refuses_the_test_split():
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "choose_fusion_weight.py"))
    with pytest.raises(SystemExit, match="validation split"):
        script["main"](["--dual-encoder", "x", "--reranker", "y", "--split", "test"])
