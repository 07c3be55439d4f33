"""GPLDAN: diversified attention head, graph pattern loss, adversarial modality classifier; save / load / pipeline."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from hf_pcme import PCMEConfig, PCMEModel, ProbabilisticEmbedding
from hf_pcme.heads import DiversifiedAttentionHead
from hf_pcme.losses import build_loss
from hf_pcme.testing import TINY_CAPTIONS, tiny_images, tiny_pcme_config, tiny_processor
from hf_pcme.training.adversarial import ModalityClassifier, reverse_gradient
from hf_pcme.training.module import ContrastiveTrainingModule
from train_callbacks import KillAfterSteps


def unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def brute_force_graph_pattern(image, text, image_attention, text_attention, mask, margin, pattern_weight,
                              diversity_weight, match_reduction):
    num_images, num_embeds, _ = image.shape
    num_texts = text.shape[0]

    def similarity(i, j):
        values = [float(image[i, k] @ text[j, m]) for k in range(num_embeds) for m in range(num_embeds)]
        return max(values) if match_reduction == "max" else sum(values) / len(values)

    s = [[similarity(i, j) for j in range(num_texts)] for i in range(num_images)]
    triplet, positives = 0.0, 0
    for i in range(num_images):
        for p in range(num_texts):
            if not mask[i, p]:
                continue
            positives += 1
            i2t = [margin + s[i][j] - s[i][p] for j in range(num_texts) if not mask[i, j]]
            t2i = [margin + s[k][p] - s[i][p] for k in range(num_images) if not mask[k, p]]
            triplet += max([0.0] + i2t) + max([0.0] + t2i)
    triplet /= positives
    nodes = [image[i, k] for i in range(num_images) for k in range(num_embeds)]
    nodes += [text[j, k] for j in range(num_texts) for k in range(num_embeds)]

    def pattern(reps):
        return [sum(float((reps[k] - node).pow(2).sum()) for k in range(num_embeds)) / num_embeds for node in nodes]

    alignment = []
    for i in range(num_images):
        for j in range(num_texts):
            if mask[i, j]:
                pv, pt = pattern(image[i]), pattern(text[j])
                alignment.append(sum((a - b) ** 2 for a, b in zip(pv, pt)) / len(nodes))
    diversity = 0.0
    for attention in (image_attention, text_attention):
        per_item = []
        for a in attention:
            rows = [row / row.norm() for row in a]
            per_item.append(sum((float(rows[k] @ rows[m]) - (k == m)) ** 2 for k in range(num_embeds)
                                for m in range(num_embeds)) / num_embeds**2)
        diversity += sum(per_item) / len(per_item)
    return triplet + pattern_weight * sum(alignment) / len(alignment) + diversity_weight * diversity


@pytest.mark.parametrize("match_reduction", ["max", "mean"])
def test_graph_pattern_loss_matches_a_loop_over_all_representation_pairs(match_reduction):
    torch.manual_seed(0)
    image, text = unit(4, 2, 5), unit(3, 2, 5)
    image_attention = torch.rand(4, 2, 6, dtype=torch.float64).softmax(-1)
    text_attention = torch.rand(3, 2, 7, dtype=torch.float64).softmax(-1)
    mask = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    loss = build_loss("graph_pattern", margin=0.3, pattern_weight=0.7, diversity_weight=0.2,
                      match_reduction=match_reduction)
    out = loss(ProbabilisticEmbedding(mean=image, attention=image_attention),
               ProbabilisticEmbedding(mean=text, attention=text_attention), mask)
    expected = brute_force_graph_pattern(image, text, image_attention, text_attention, mask, 0.3, 0.7, 0.2,
                                         match_reduction)
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert set(out.components) == {"triplet", "graph_pattern", "diversity"}


def test_graph_pattern_term_is_zero_when_matched_items_coincide():
    image = unit(3, 2, 4)
    out = build_loss("graph_pattern", diversity_weight=0.0)(ProbabilisticEmbedding(mean=image),
                                                             ProbabilisticEmbedding(mean=image.clone()))
    assert out.components["graph_pattern"].item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------- adversarial
def test_gradient_reversal_flips_the_sign_of_the_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    weights = torch.randn(3, 4)
    out = reverse_gradient(x, 0.25)
    assert torch.equal(out, x)
    (out * weights).sum().backward()
    assert torch.equal(x.grad, -0.25 * weights)


def test_classifier_learns_while_the_features_get_the_reversed_gradient():
    torch.manual_seed(0)
    classifier = ModalityClassifier(4, hidden_dim=8, weight=0.5, schedule="constant")
    image = torch.randn(3, 4, requires_grad=True)
    text = torch.randn(2, 4, requires_grad=True)
    out = classifier(ProbabilisticEmbedding(mean=image), ProbabilisticEmbedding(mean=text))
    out["modality_classifier"].backward()
    # the same loss without the reversal layer
    plain_image, plain_text = image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()
    logits = classifier.net(torch.cat([plain_image, plain_text])).squeeze(-1)
    targets = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    F.binary_cross_entropy_with_logits(logits, targets).backward()
    torch.testing.assert_close(image.grad, -0.5 * plain_image.grad)
    torch.testing.assert_close(text.grad, -0.5 * plain_text.grad)
    expected_accuracy = ((logits > 0).float() == targets).float().mean()
    assert out["modality_accuracy"].item() == pytest.approx(expected_accuracy.item())


def test_dann_schedule_ramps_from_zero_to_the_weight():
    classifier = ModalityClassifier(4, weight=0.2, schedule="dann", ramp_steps=10)
    assert classifier.coefficient() == 0.0
    classifier.num_steps.fill_(10)
    assert classifier.coefficient() == pytest.approx(0.2 * (2 / (1 + math.exp(-10)) - 1))
    assert ModalityClassifier(4, weight=0.2, schedule="constant").coefficient() == 0.2


def test_classifier_is_training_state_not_part_of_the_saved_model(tmp_path):
    torch.manual_seed(0)
    processor = tiny_processor()
    model = PCMEModel(tiny_pcme_config(head_type="diversified_attention", num_embeds=2, loss_type="graph_pattern"))
    classifier = ModalityClassifier(model.config.embed_dim, hidden_dim=8, weight=0.1, schedule="constant")
    module = ContrastiveTrainingModule(model, modality_classifier=classifier).train()
    inputs = processor(images=tiny_images(4), text=list(TINY_CAPTIONS))
    output = module(**inputs)
    assert {"modality_classifier", "modality_accuracy", "modality_reversal"} <= set(output.components)
    model_loss = model.compute_loss(model.get_image_features(inputs["pixel_values"]),
                                    model.get_text_features(inputs["input_ids"], inputs["attention_mask"])).loss
    torch.testing.assert_close(output.loss - output.components["modality_classifier"], model_loss)
    output.loss.backward()
    assert classifier.net[0].weight.grad is not None and int(classifier.num_steps) == 1
    assert any(key.startswith("modality_classifier.") for key in module.state_dict())
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:
        assert not any("modality" in key for key in saved.keys())


def test_a_discriminator_weight_without_a_modality_classifier_names_the_option():
    from hf_pcme.training.config import recipe_from_dict

    with pytest.raises(ValueError, match="train.modality_classifier_weight"):
        recipe_from_dict({"model": {"vision_config": {"model_type": "resnet"}},
                          "train": {"modality_classifier_weight": 0.5}})
    with pytest.raises(ValueError, match="modality_classifier_schedule"):
        ModalityClassifier(4, schedule="linear")


# ---------------------------------------------------------------------------------------- head
def test_k_below_one_names_the_option():
    with pytest.raises(ValueError, match="num_embeds"):
        tiny_pcme_config(head_type="diversified_attention", num_embeds=0)
    with pytest.raises(ValueError, match="num_embeds"):
        DiversifiedAttentionHead(4, 4, 3, 2, num_embeds=0)


def test_diversified_head_follows_its_formula():
    torch.manual_seed(0)
    head = DiversifiedAttentionHead(local_dim=6, global_dim=5, embed_dim=4, hidden_dim=3, num_embeds=3).eval()
    local, global_feature = torch.randn(2, 7, 6), torch.randn(2, 5)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    out = head(local, global_feature, mask)
    assert out.mean.shape == (2, 3, 4) and out.attention.shape == (2, 3, 7)
    assert torch.all(out.attention[1, :, 4:] == 0)
    for b in range(2):
        valid = local[b][mask[b]]
        scores = head.attention.w2(torch.tanh(head.attention.w1(valid))).t()  # (K, L_valid)
        pooled = scores.softmax(-1) @ valid
        mixed = pooled + (head.query(pooled) @ head.key(pooled).t() / math.sqrt(6)).softmax(-1) @ head.value(pooled)
        expected = head.layer_norm(head.global_proj(global_feature[b]) + torch.sigmoid(head.local_proj(mixed)))
        torch.testing.assert_close(out.mean[b], F.normalize(expected, dim=-1))


# ---------------------------------------------------------------------------------------- save / load / pipeline
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpldan")
    torch.manual_seed(0)
    model = PCMEModel(tiny_pcme_config(head_type="diversified_attention", num_embeds=2, loss_type="graph_pattern")).eval()
    processor = tiny_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


def test_round_trip_and_best_pair_scores(saved):
    folder, model, processor = saved
    reloaded = PCMEModel.from_pretrained(folder).eval()
    inputs = processor(images=tiny_images(3), text=list(TINY_CAPTIONS))
    with torch.no_grad():
        out = reloaded(**inputs)
        torch.testing.assert_close(out.logits_per_image, model(**inputs).logits_per_image)
    image, text = out.image_embeds.mean, out.text_embeds.mean
    expected = torch.tensor([[max(float(image[i, k] @ text[j, m]) for k in range(2) for m in range(2))
                              for j in range(4)] for i in range(3)])
    torch.testing.assert_close(out.logits_per_image, expected)
    from hf_pcme.training.evaluation import default_scorer

    assert default_scorer(reloaded) == "polysemous"


def test_remote_code_model_and_pipeline_work_without_the_package(saved):
    folder, model, processor = saved
    from transformers import pipeline

    from hf_pcme.pipeline_cross_modal_retrieval import TASK

    image_path = folder.parent / "query.png"
    tiny_images(3)[2].save(image_path)
    local = pipeline(TASK, model=model, processor=processor, device="cpu", progress_bar=False)
    expected = local(images=str(image_path), corpus=list(TINY_CAPTIONS), top_k=3)
    # the pipeline's ranking is the best of the K x K cosines
    with torch.no_grad():
        query = model.get_image_features(processor(images=[tiny_images(3)[2]])["pixel_values"]).mean
        encoded = processor(text=list(TINY_CAPTIONS))
        captions = model.get_text_features(encoded["input_ids"], encoded["attention_mask"]).mean
    best = [max(float(query[0, k] @ captions[j, m]) for k in range(2) for m in range(2)) for j in range(4)]
    assert [r["score"] for r in expected["results"]] == pytest.approx(sorted(best, reverse=True)[:3], rel=1e-5)
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["hf_pcme"] = None  # only the folder's code may be used
        from transformers import pipeline
        retriever = pipeline({TASK!r}, model={str(folder)!r}, trust_remote_code=True, device="cpu")
        assert type(retriever.model).__module__.startswith("transformers_modules")
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


# ---------------------------------------------------------------------------------------- trainer
TINY = [
    "model.vision_config={model_type: resnet, embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1], "
    "layer_type: basic, downsample_in_first_stage: false}",
    "model.text_config={model_type: pcme_bigru, word_dim: 8, hidden_size: 16}",
    "model.embed_dim=8",
    "data.image_size=32",
    "train.batch_size=8",
    "train.phase2_steps=4",
    "train.warmup_steps=1",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.eval_every=0",
    "eval.enabled=false",
    "logging=jsonl",
    "train.modality_classifier_ramp_steps=2",
]


def _tiny_recipe(output_dir, cache_dir, *extra):
    from pathlib import Path

    from hf_pcme.training.config import load_recipe

    options = f"data.options={{num_images: 8, num_eval_images: 4, image_size: 32, cache_dir: {cache_dir}}}"
    repo = Path(__file__).resolve().parents[1]
    return load_recipe(repo / "configs" / "shapes_gpldan.yaml", [*TINY, options, f"output_dir={output_dir}", *extra])


def test_resumed_run_restores_the_modality_classifier(tmp_path):
    import json

    from hf_pcme.training.trainer import Trainer, train

    cache = tmp_path / "cache"
    full = train(_tiny_recipe(tmp_path / "full", cache))
    stopped = train(_tiny_recipe(tmp_path / "resumed", cache), callbacks=[KillAfterSteps(2)])
    assert stopped.interrupted
    trainer = Trainer(_tiny_recipe(tmp_path / "resumed", cache))
    resumed = trainer.train(resume=True)
    assert int(trainer.modality_classifier.num_steps) == 4  # restored at 2, then two more forward passes
    for name, weight in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], weight, rtol=0, atol=0, msg=name)
    logs = [json.loads(line) for line in (tmp_path / "full" / "logs").rglob("*.jsonl").__next__().read_text().splitlines()]
    accuracies = [row["train/modality_accuracy"] for row in logs if "train/modality_accuracy" in row]
    assert len(accuracies) == 4 and all(0.0 <= a <= 1.0 for a in accuracies)
