"""PCMEModel: shapes, masks, scoring formulas, gradients, configuration errors."""

import math

import pytest
import torch

from hf_pcme import PCMEConfig, PCMEModel, ProbabilisticEmbedding
from hf_pcme.testing import TINY_CAPTIONS, tiny_images, tiny_pcme_config, tiny_processor


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def batch(processor):
    return processor(images=tiny_images(4), text=list(TINY_CAPTIONS))


@pytest.mark.parametrize(
    "head_type, mean_shape, has_variance",
    [("probabilistic", (4, 8), True), ("deterministic", (4, 8), False), ("polysemous", (4, 2, 8), False)],
)
def test_forward_shapes_per_head_type(batch, head_type, mean_shape, has_variance):
    loss_type = {"probabilistic": "pcme", "deterministic": "vsepp", "polysemous": "pvse"}[head_type]
    model = PCMEModel(tiny_pcme_config(head_type=head_type, loss_type=loss_type)).eval()
    out = model(**batch)
    assert out.image_embeds.mean.shape == mean_shape
    assert out.text_embeds.mean.shape == mean_shape
    assert out.logits_per_image.shape == (4, 4)
    assert torch.equal(out.logits_per_text, out.logits_per_image.t())
    assert out.match_prob.shape == (4, 4) and bool(((out.match_prob >= 0) & (out.match_prob <= 1)).all())
    assert (out.image_embeds.log_sigma2 is not None) == has_variance
    assert (out.image_embeds.samples is not None) == has_variance
    # Means are L2-normalised (PIE head).
    torch.testing.assert_close(out.image_embeds.mean.norm(dim=-1), torch.ones(mean_shape[:-1]))
    if has_variance:
        assert out.image_embeds.samples.shape == (4, 3, 8)
        expected = out.text_embeds.log_sigma2.exp().mean(-1)
        torch.testing.assert_close(out.text_embeds.uncertainty, expected)
    else:
        assert out.image_embeds.uncertainty is None


def test_cnn_grid_gives_one_local_feature_per_cell(batch):
    model = PCMEModel(tiny_pcme_config()).eval()
    image = model.get_image_features(batch["pixel_values"])
    grid = model.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state
    assert image.attention.shape == (4, 1, grid.shape[2] * grid.shape[3])
    torch.testing.assert_close(image.attention.sum(-1), torch.ones(4, 1))


def test_text_padding_is_ignored(processor):
    model = PCMEModel(tiny_pcme_config()).eval()
    short, long = "some shapes", "a small red circle at the top left"
    alone = model.get_text_features(**processor(text=[short]), num_samples=0)
    padded_inputs = processor(text=[short, long])
    assert padded_inputs["attention_mask"][0].sum() < padded_inputs["attention_mask"].shape[1]
    padded = model.get_text_features(**padded_inputs, num_samples=0)
    torch.testing.assert_close(padded.mean[0], alone.mean[0])
    torch.testing.assert_close(padded.log_sigma2[0], alone.log_sigma2[0])
    real_tokens = int(padded_inputs["attention_mask"][0].sum())
    assert float(padded.attention[0, 0, real_tokens:].detach().abs().sum()) == 0.0


def test_samples_have_the_predicted_mean_and_variance():
    model = PCMEModel(tiny_pcme_config())
    mean = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    log_sigma2 = torch.tensor([[-2.0] * 8, [0.5] * 8])
    embedding = model._with_samples(
        ProbabilisticEmbedding(mean=mean, log_sigma2=log_sigma2), 20000, torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(embedding.samples.mean(1), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(embedding.samples.var(1), log_sigma2.exp(), atol=0.06, rtol=0.05)


def _brute_force_sampled_match_probability(samples_x, samples_y, a, b):
    n, m = samples_x.shape[0], samples_y.shape[0]
    result = torch.zeros(n, m, dtype=torch.float64)
    for i in range(n):
        for j in range(m):
            total = 0.0
            for zx in samples_x[i].detach().double():
                for zy in samples_y[j].detach().double():
                    distance = math.sqrt(float(((zx - zy) ** 2).sum()) + 1e-6)
                    total += 1.0 / (1.0 + math.exp(-2.0 * (-a * distance + b)))
            result[i, j] = total / (samples_x.shape[1] * samples_y.shape[1])
    return result


def test_sampled_match_probability_equals_brute_force(batch):
    model = PCMEModel(tiny_pcme_config(init_negative_scale=3.0, init_shift=2.0)).eval()
    out = model(**batch)
    expected = _brute_force_sampled_match_probability(out.image_embeds.samples, out.text_embeds.samples, 3.0, 2.0)
    torch.testing.assert_close(out.match_prob.double(), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits_per_image.double(), expected.log(), atol=1e-4, rtol=1e-4)


def test_csd_match_probability_equals_formula(batch):
    model = PCMEModel(tiny_pcme_config(match_function="csd", loss_type="pcme++")).eval()
    out = model(**batch)
    image, text = out.image_embeds, out.text_embeds
    expected = torch.zeros(4, 4)
    for i in range(4):
        for j in range(4):
            csd = ((image.mean[i] - text.mean[j]) ** 2).sum() + image.log_sigma2[i].exp().sum()
            csd = csd + text.log_sigma2[j].exp().sum()
            expected[i, j] = torch.sigmoid(-5.0 * csd + 5.0)
    torch.testing.assert_close(out.match_prob, expected, atol=1e-5, rtol=1e-4)


def test_polysemous_logits_are_max_over_embedding_pairs(batch):
    model = PCMEModel(tiny_pcme_config(head_type="polysemous", loss_type="pvse", num_embeds=3)).eval()
    out = model(**batch)
    image, text = out.image_embeds.mean.detach(), out.text_embeds.mean.detach()
    expected = torch.tensor([[max(float(u @ v) for u in image[i] for v in text[j]) for j in range(4)] for i in range(4)])
    torch.testing.assert_close(out.logits_per_image, expected, atol=1e-5, rtol=1e-5)


def test_loss_gradients_reach_both_towers_and_match_parameters(batch):
    model = PCMEModel(tiny_pcme_config())
    out = model(**batch, return_loss=True)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.loss_components)
    out.loss.backward()
    for name in ("vision_model", "text_model", "image_head", "text_head"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert any(g is not None and float(g.abs().sum()) > 0 for g in grads), name
    assert model.negative_scale.grad is not None and float(model.negative_scale.grad) != 0.0
    assert model.shift.grad is not None and float(model.shift.grad) != 0.0


def test_match_parameters_frozen_for_losses_that_do_not_use_them():
    model = PCMEModel(tiny_pcme_config(head_type="deterministic", loss_type="vsepp"))
    assert not model.negative_scale.requires_grad and not model.shift.requires_grad


def test_multi_positive_mask_changes_the_loss(batch):
    model = PCMEModel(tiny_pcme_config()).eval()
    torch.manual_seed(3)
    diagonal = model(**batch, return_loss=True, num_samples=3).loss
    mask = torch.eye(4, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = True
    torch.manual_seed(3)
    multi = model(**batch, return_loss=True, num_samples=3, positive_mask=mask).loss
    assert not torch.isclose(diagonal, multi)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("head_type", "gaussian", "deterministic, diversified_attention, polysemous, probabilistic"),
        ("loss_type", "triplet", "pcme"),
        ("match_function", "mean", "csd, sampled"),
        ("embed_dim", 0, "embed_dim"),
    ],
)
def test_bad_config_values_name_the_valid_choices(field, value, message):
    # Names of nn registries (heads, losses) are checked when the model is built: the config imports no nn code.
    with pytest.raises(ValueError, match=message):
        PCMEModel(tiny_pcme_config(**{field: value}))


def test_unknown_tower_type_is_a_clear_error():
    with pytest.raises(ValueError, match="vision_config has unknown model_type 'resnet9000'"):
        PCMEConfig(vision_config={"model_type": "resnet9000"})


def test_bad_input_shapes_name_the_argument(batch):
    model = PCMEModel(tiny_pcme_config()).eval()
    with pytest.raises(ValueError, match="pixel_values"):
        model.get_image_features(batch["pixel_values"][0])
    with pytest.raises(ValueError, match="attention_mask"):
        model.get_text_features(batch["input_ids"], batch["attention_mask"][:, :-1])
    with pytest.raises(ValueError, match="input_ids"):
        model.get_text_features(batch["input_ids"][0])


def test_transformers_backbones_as_towers():
    vit = {
        "model_type": "vit", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32, "image_size": 32, "patch_size": 8,
    }
    bert = {
        "model_type": "bert", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 32,
    }
    model = PCMEModel(tiny_pcme_config(vision_config=vit, text_config=bert)).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    input_ids = torch.tensor([[2, 5, 6, 0], [2, 7, 0, 0]])
    attention_mask = (input_ids != 0).long()
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    assert out.image_embeds.attention.shape == (2, 1, 17)  # 16 patches + CLS
    assert out.text_embeds.attention.shape == (2, 1, 4)
    assert float(out.text_embeds.attention[1, 0, 2:].sum().detach()) == 0.0


def test_from_vision_text_pretrained_uses_the_saved_towers(tmp_path):
    reference = PCMEModel(tiny_pcme_config())
    reference.vision_model.save_pretrained(tmp_path / "vision")
    reference.text_model.save_pretrained(tmp_path / "text")
    model = PCMEModel.from_vision_text_pretrained(tmp_path / "vision", tmp_path / "text", embed_dim=8, num_samples=3)
    for tower in ("vision_model", "text_model"):
        expected = getattr(reference, tower).state_dict()
        for key, value in getattr(model, tower).state_dict().items():
            torch.testing.assert_close(value, expected[key])
    assert model.config.text_config.model_type == "pcme_bigru"


def test_word_vectors_initialise_known_words(tmp_path):
    processor = tiny_processor()
    model = PCMEModel(tiny_pcme_config())
    vocab = processor.tokenizer.get_vocab()
    glove = tmp_path / "glove.txt"
    glove.write_text("red " + " ".join(["0.5"] * 8) + "\nunknownword " + " ".join(["1"] * 8) + "\n")
    assert model.text_model.load_word_vectors(glove, vocab) == 1
    torch.testing.assert_close(model.text_model.word_embeddings.weight[vocab["red"]], torch.full((8,), 0.5))
    glove.write_text("red 0.1 0.2\n")
    with pytest.raises(ValueError, match="word_dim"):
        model.text_model.load_word_vectors(glove, vocab)


def test_init_log_sigma2_sets_the_starting_variance_and_survives_reload(batch, tmp_path):
    model = PCMEModel(tiny_pcme_config(init_log_sigma2=-5.0)).eval()
    text = model.get_text_features(batch["input_ids"], batch["attention_mask"], num_samples=0)
    # log_sigma2 = fc(local) + fc(global) + bias: small random weights around the -5 bias.
    assert float((text.log_sigma2.detach() + 5.0).abs().max()) < 1.0
    with torch.no_grad():
        model.image_head.uncertainty_branch.bias.fill_(-2.0)  # as if trained
    model.save_pretrained(tmp_path)
    reloaded = PCMEModel.from_pretrained(tmp_path)
    assert reloaded.image_head.uncertainty_branch.bias.eq(-2.0).all()
    with pytest.raises(ValueError, match="init_log_sigma2 only applies"):
        tiny_pcme_config(head_type="deterministic", loss_type="vsepp", init_log_sigma2=-5.0)
