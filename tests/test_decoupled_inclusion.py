"""The decoupled recipe: InfoNCE on the means, inclusion terms on the variances, a Platt term on a and b
(loss ``infonce_inclusion``), and ``PCMEConfig.ranking_score``; each against values computed here."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from hf_pcme import PCMEConfig, PCMEModel
from hf_pcme.losses import build_loss
from hf_pcme.outputs import ProbabilisticEmbedding
from hf_pcme.scoring import default_score, default_search_score
from hf_pcme.testing import tiny_pcme_config
from hf_pcme.training.config import load_recipe

REPO = Path(__file__).resolve().parent.parent
DIM = 4


def _gaussians(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mean = torch.nn.functional.normalize(torch.randn(count, DIM, generator=generator, dtype=torch.float64), dim=-1)
    log_sigma2 = torch.rand(count, DIM, generator=generator, dtype=torch.float64) * 2 - 4
    return mean, log_sigma2


def _brute_infonce(image_mean, text_mean, mask, scale) -> float:
    """(i2t + t2i) / 2 of the soft-target cross-entropy, uniform over each query's positives, a loop per query."""

    def one_side(queries, items, positives):
        total, rows = 0.0, 0
        for q in range(queries.shape[0]):
            chosen = [j for j in range(items.shape[0]) if positives[q][j]]
            if not chosen:
                continue
            logits = [scale * float(queries[q] @ items[j]) for j in range(items.shape[0])]
            log_norm = math.log(sum(math.exp(value) for value in logits))
            total += -sum(logits[j] - log_norm for j in chosen) / len(chosen)
            rows += 1
        return total / rows

    mask = mask.tolist()
    transposed = [list(column) for column in zip(*mask)]
    return 0.5 * (one_side(image_mean, text_mean, mask) + one_side(text_mean, image_mean, transposed))


def _incl(mu1, log1, mu2, log2, gamma) -> float:
    total = 0.0
    for d in range(DIM):
        s = math.exp(float(log1[d])) / gamma + math.exp(float(log2[d]))
        total += 0.5 * (math.log(s) + float(mu1[d] - mu2[d]) ** 2 / s)
    return total / DIM


def _kl(mean, log_sigma2) -> float:
    """Mean over the elements of KL(N(mu, sigma^2) || N(0, 1))."""
    values = [-0.5 * (1 + float(l) - float(m) ** 2 - math.exp(float(l))) for m, l in zip(mean.flatten(), log_sigma2.flatten())]
    return sum(values) / len(values)


def _setup():
    image_mean, image_log = _gaussians(3, 11)
    text_mean, text_log = _gaussians(3, 12)
    partial_mean, partial_log = _gaussians(2, 13)
    positives = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    included = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 0, 1]], dtype=torch.bool)
    return image_mean, image_log, text_mean, text_log, partial_mean, partial_log, positives, included


def test_infonce_inclusion_is_infonce_plus_inclusion_vib_and_platt_terms():
    image_mean, image_log, text_mean, text_log, partial_mean, partial_log, positives, included = _setup()
    a, b = torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    loss = build_loss("infonce_inclusion", image_inclusion_weight=0.5, partial_inclusion_weight=0.25, gamma=2.0,
                      vib_beta=0.01, calibration_weight=0.7, init_logit_scale=math.log(5.0))
    output = loss(ProbabilisticEmbedding(mean=image_mean, log_sigma2=image_log),
                  ProbabilisticEmbedding(mean=text_mean, log_sigma2=text_log), positives, negative_scale=a, shift=b,
                  partial_text=ProbabilisticEmbedding(mean=partial_mean, log_sigma2=partial_log),
                  partial_source=ProbabilisticEmbedding(mean=text_mean[:2], log_sigma2=text_log[:2]),
                  inclusion_mask=included)

    contrastive = _brute_infonce(image_mean, text_mean, positives, 5.0)
    pairs = [(i, j) for i in range(3) for j in range(3) if included[i, j]]
    image_term = sum(_incl(image_mean[i], image_log[i], text_mean[j], text_log[j], 2.0) for i, j in pairs) / len(pairs)
    partial_term = sum(_incl(text_mean[k], text_log[k], partial_mean[k], partial_log[k], 2.0) for k in range(2)) / 2
    vib = _kl(image_mean, image_log) + _kl(text_mean, text_log)
    calibration = 0.0
    for i in range(3):
        for j in range(3):
            csd = float(((image_mean[i] - text_mean[j]) ** 2).sum() + image_log[i].exp().sum() + text_log[j].exp().sum())
            p = 1 / (1 + math.exp(3.0 * csd - 2.0))
            target = float(positives[i, j] or included[i, j])  # a positive or an included pair is a match
            calibration += -(target * math.log(p) + (1 - target) * math.log(1 - p))
    calibration /= 9

    components = output.components
    assert components["contrastive"].item() == pytest.approx(contrastive, rel=1e-6)
    assert components["image_inclusion"].item() == pytest.approx(0.5 * image_term, rel=1e-6)
    assert components["partial_inclusion"].item() == pytest.approx(0.25 * partial_term, rel=1e-6)
    assert components["vib"].item() == pytest.approx(0.01 * vib, rel=1e-6)
    assert components["calibration"].item() == pytest.approx(0.7 * calibration, rel=1e-5)
    total = contrastive + 0.5 * image_term + 0.25 * partial_term + 0.01 * vib + 0.7 * calibration
    assert output.loss.item() == pytest.approx(total, rel=1e-5)


def test_means_learn_only_from_infonce_and_a_b_only_from_the_platt_term():
    image_mean, image_log, text_mean, text_log, _, _, positives, included = _setup()

    def gradients(name: str, **kwargs) -> dict[str, torch.Tensor | None]:
        leaves = {"image_mean": image_mean.clone().requires_grad_(), "image_log": image_log.clone().requires_grad_(),
                  "text_mean": text_mean.clone().requires_grad_(), "text_log": text_log.clone().requires_grad_(),
                  "a": torch.tensor(3.0, dtype=torch.float64, requires_grad=True),
                  "b": torch.tensor(2.0, dtype=torch.float64, requires_grad=True)}
        loss = build_loss(name, **kwargs)
        extra = {"negative_scale": leaves["a"], "shift": leaves["b"], "inclusion_mask": included} \
            if name == "infonce_inclusion" else {}
        output = loss(ProbabilisticEmbedding(mean=leaves["image_mean"], log_sigma2=leaves["image_log"]),
                      ProbabilisticEmbedding(mean=leaves["text_mean"], log_sigma2=leaves["text_log"]), positives, **extra)
        output.loss.backward()
        return {key: leaf.grad for key, leaf in leaves.items()}

    decoupled = gradients("infonce_inclusion", vib_beta=0.1, calibration_weight=1.0)
    baseline = gradients("infonce")
    for key in ("image_mean", "text_mean"):  # exactly the deterministic baseline's gradient
        assert torch.allclose(decoupled[key], baseline[key], rtol=0, atol=1e-12)
    for key in ("image_log", "text_log"):
        assert decoupled[key].abs().sum() > 0
    assert decoupled["a"] != 0 and decoupled["b"] != 0
    without_platt = gradients("infonce_inclusion", vib_beta=0.1, calibration_weight=0.0)
    assert without_platt["a"] is None and without_platt["b"] is None
    for key in ("image_log", "text_log"):  # the Platt term sends nothing into the variances
        assert torch.allclose(decoupled[key], without_platt[key], rtol=0, atol=1e-12)


def test_infonce_inclusion_refuses_point_embeddings_and_bad_weights():
    mean, _ = _gaussians(2, 0)
    with pytest.raises(ValueError, match="log_sigma2|variance"):
        build_loss("infonce_inclusion")(ProbabilisticEmbedding(mean=mean), ProbabilisticEmbedding(mean=mean),
                                        negative_scale=torch.tensor(1.0), shift=torch.tensor(0.0))
    with pytest.raises(ValueError, match="calibration_weight"):
        build_loss("infonce_inclusion", calibration_weight=-1.0)


def test_ranking_score_cosine_ranks_by_the_means_and_keeps_the_csd_match_probability():
    torch.manual_seed(0)
    model = PCMEModel(tiny_pcme_config(match_function="csd", loss_type="infonce_inclusion", ranking_score="cosine")).eval()
    assert default_score(model.config) == "cosine" and default_search_score(model.config) == "cosine"
    image_mean, image_log = _gaussians(3, 21)
    text_mean, text_log = _gaussians(4, 22)
    image = ProbabilisticEmbedding(mean=(image_mean * 2).float(), log_sigma2=image_log.float())
    text = ProbabilisticEmbedding(mean=text_mean.float(), log_sigma2=text_log.float())
    a, b = float(model.negative_scale.detach()), float(model.shift.detach())
    logits, probability = model.pairwise_logits(image, text), model.match_probability(image, text)
    for i in range(3):
        for j in range(4):
            cosine = float(image_mean[i] @ text_mean[j])  # the means are unit vectors before the x2
            csd = float(((2 * image_mean[i] - text_mean[j]) ** 2).sum() + image_log[i].exp().sum()
                        + text_log[j].exp().sum())
            assert logits[i, j].item() == pytest.approx(cosine, abs=1e-5)
            assert probability[i, j].item() == pytest.approx(1 / (1 + math.exp(a * csd - b)), abs=1e-5)
    assert default_score(tiny_pcme_config(match_function="csd")) == "csd"  # unset: derived as before


def test_ranking_score_must_name_a_score_the_head_can_give():
    with pytest.raises(ValueError, match="ranking_score"):
        PCMEConfig(ranking_score="dot")
    with pytest.raises(ValueError, match="head_type 'polysemous'"):
        PCMEConfig(ranking_score="cosine", head_type="polysemous")


def test_decoupled_recipe_loads_with_duplicate_caption_inclusion():
    recipe = load_recipe(REPO / "configs" / "shapes_infonce_dupincl.yaml")
    assert recipe.model.loss_type == "infonce_inclusion" and recipe.model.ranking_score == "cosine"
    assert recipe.train.duplicate_caption_inclusion


def _log_sigma2_gradients(**kwargs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    image_mean, image_log, text_mean, text_log, _, _, positives, included = _setup()
    image_leaf, text_leaf = image_log.clone().requires_grad_(), text_log.clone().requires_grad_()
    loss = build_loss("infonce_inclusion", **kwargs)
    output = loss(ProbabilisticEmbedding(mean=image_mean, log_sigma2=image_leaf),
                  ProbabilisticEmbedding(mean=text_mean, log_sigma2=text_leaf), positives,
                  negative_scale=torch.tensor(3.0, dtype=torch.float64), shift=torch.tensor(2.0, dtype=torch.float64),
                  inclusion_mask=included)
    output.loss.backward()
    return image_leaf.grad, text_leaf.grad


def test_untrained_inner_variance_fits_only_the_outer_gaussian():
    image_grad, text_grad = _log_sigma2_gradients(vib_beta=0.0, calibration_weight=0.0, partial_inclusion_weight=0.0,
                                                  image_inclusion_weight=1.0, gamma=2.0, train_inner_variance=False)
    assert image_grad is None  # the images are the inner items: only the captions' variances learn
    image_mean, image_log, text_mean, text_log, _, _, _, included = _setup()
    pairs = [(i, j) for i in range(3) for j in range(3) if included[i, j]]
    for j in range(3):
        for d in range(DIM):
            # d/d log sigma_t^2 of 1/2 [log s + g / s], s = sigma_v^2 / gamma + sigma_t^2, averaged over pairs and D
            expected = 0.0
            for i, jj in pairs:
                if jj != j:
                    continue
                var_t = math.exp(float(text_log[j, d]))
                s = math.exp(float(image_log[i, d])) / 2.0 + var_t
                g = float(image_mean[i, d] - text_mean[j, d]) ** 2
                expected += 0.5 * (1 / s - g / s**2) * var_t / (len(pairs) * DIM)
            assert text_grad[j, d].item() == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_calibration_trains_variances_sends_the_platt_gradient_into_them():
    frozen = _log_sigma2_gradients(vib_beta=0.0, image_inclusion_weight=0.0, partial_inclusion_weight=0.0)
    assert frozen == (None, None)
    image_grad, text_grad = _log_sigma2_gradients(vib_beta=0.0, image_inclusion_weight=0.0, partial_inclusion_weight=0.0,
                                                  calibration_trains_variances=True)
    image_mean, image_log, text_mean, text_log, _, _, positives, included = _setup()
    for j in range(3):
        for d in range(DIM):
            # BCE(sigmoid(-a CSD + b), y): d/d log sigma_t^2 = (p - y) (-a sigma_t^2), mean over the 9 pairs
            expected = 0.0
            for i in range(3):
                csd = float(((image_mean[i] - text_mean[j]) ** 2).sum() + image_log[i].exp().sum() + text_log[j].exp().sum())
                p = 1 / (1 + math.exp(3.0 * csd - 2.0))
                y = float(positives[i, j] or included[i, j])
                expected += (p - y) * -3.0 * math.exp(float(text_log[j, d])) / 9
            assert text_grad[j, d].item() == pytest.approx(expected, rel=1e-6)
    assert image_grad.abs().sum() > 0
