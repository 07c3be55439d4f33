"""Uncertainty recipes: the inclusion loss, CSD on points, soft targets, word dropping, mixing, duplicate
positives and the frozen-sigma ablation, each against values computed independently here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_pcme import PCMEModel
from hf_pcme.loss_inclusion import inclusion_loss
from hf_pcme.losses import build_loss
from hf_pcme.outputs import ProbabilisticEmbedding
from hf_pcme.testing import tiny_pcme_config
from hf_pcme.training.augment import caption_keys, drop_words, duplicate_caption_mask, mix_images
from hf_pcme.training.config import load_recipe
from hf_pcme.training.module import ContrastiveTrainingModule
from hf_pcme.training.optim import freeze_uncertainty

REPO = Path(__file__).resolve().parent.parent

DIM = 4


def _gaussians(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mean = torch.nn.functional.normalize(torch.randn(count, DIM, generator=generator, dtype=torch.float64), dim=-1)
    log_sigma2 = torch.rand(count, DIM, generator=generator, dtype=torch.float64) * 2 - 4
    return mean, log_sigma2


def _bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def _brute_csd_loss(image_mean, image_var, text_mean, text_var, targets, a, b) -> float:
    """2 * mean BCE of -a CSD + b (no VIB, no pseudo-positives), one pair at a time."""
    total = 0.0
    n, m = targets.shape
    for i in range(n):
        for j in range(m):
            csd = float(((image_mean[i] - text_mean[j]) ** 2).sum() + image_var[i].sum() + text_var[j].sum())
            total += _bce(-a * csd + b, float(targets[i, j]))
    return 2 * total / (n * m)


# --------------------------------------------------------------------------- inclusion measure
def test_inclusion_loss_equals_numerical_integral():
    mean_inner, log_inner = _gaussians(2, 0)
    mean_outer, log_outer = _gaussians(2, 1)
    gamma = 4.0
    loss = inclusion_loss(mean_inner, log_inner, mean_outer, log_outer, gamma)
    for row in range(2):
        per_dim = []
        for d in range(DIM):
            mu1, var1 = float(mean_inner[row, d]), math.exp(float(log_inner[row, d]))
            mu2, var2 = float(mean_outer[row, d]), math.exp(float(log_outer[row, d]))
            # -log of E_{x ~ N(mu1, var1 / gamma)} N(x; mu2, var2), by quadrature on a fine grid.
            sharp = var1 / gamma
            x = np.linspace(mu1 - 12 * math.sqrt(sharp), mu1 + 12 * math.sqrt(sharp), 200_001)
            inner = np.exp(-((x - mu1) ** 2) / (2 * sharp)) / math.sqrt(2 * math.pi * sharp)
            outer = np.exp(-((x - mu2) ** 2) / (2 * var2)) / math.sqrt(2 * math.pi * var2)
            expected = -math.log(np.trapezoid(inner * outer, x)) - 0.5 * math.log(2 * math.pi)
            per_dim.append(expected)
        assert loss[row].item() == pytest.approx(sum(per_dim) / DIM, rel=1e-6)


def test_inclusion_loss_prefers_an_outer_gaussian_as_wide_as_the_gap():
    """For fixed inner items the optimal outer variance is (mu_1 - mu_2)^2 - sigma_1^2 / gamma."""
    gap, inner_var, gamma = 0.3, 0.01, 10.0
    candidates = torch.linspace(-6, 0, 601, dtype=torch.float64)
    losses = [inclusion_loss(torch.tensor([[gap]]), torch.tensor([[math.log(inner_var)]]), torch.zeros(1, 1),
                             torch.tensor([[float(c)]]), gamma).item() for c in candidates]
    best = math.exp(float(candidates[int(np.argmin(losses))]))
    assert best == pytest.approx(gap**2 - inner_var / gamma, rel=0.02)


def test_prolip_loss_is_csd_plus_weighted_inclusion_terms():
    image_mean, image_log = _gaussians(3, 2)
    text_mean, text_log = _gaussians(3, 3)
    partial_mean, partial_log = _gaussians(2, 4)
    mask = torch.tensor([[1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    a, b = torch.tensor(3.0), torch.tensor(2.0)
    loss = build_loss("prolip", vib_beta=0.0, pseudo_positive_weight=0.0, image_inclusion_weight=0.5,
                      partial_inclusion_weight=0.25, gamma=2.0)
    output = loss(ProbabilisticEmbedding(mean=image_mean, log_sigma2=image_log),
                  ProbabilisticEmbedding(mean=text_mean, log_sigma2=text_log), mask, negative_scale=a, shift=b,
                  partial_text=ProbabilisticEmbedding(mean=partial_mean, log_sigma2=partial_log),
                  partial_source=ProbabilisticEmbedding(mean=text_mean[:2], log_sigma2=text_log[:2]))

    def incl(mu1, log1, mu2, log2):
        total = 0.0
        for d in range(DIM):
            s = math.exp(float(log1[d])) / 2.0 + math.exp(float(log2[d]))
            total += 0.5 * (math.log(s) + float(mu1[d] - mu2[d]) ** 2 / s)
        return total / DIM

    pairs = [(0, 0), (1, 1), (1, 2), (2, 2)]
    image_term = sum(incl(image_mean[i], image_log[i], text_mean[j], text_log[j]) for i, j in pairs) / len(pairs)
    partial_term = sum(incl(text_mean[k], text_log[k], partial_mean[k], partial_log[k]) for k in range(2)) / 2
    matching = _brute_csd_loss(image_mean, image_log.exp(), text_mean, text_log.exp(), mask.double(), 3.0, 2.0)
    assert output.components["matching"].item() == pytest.approx(matching, rel=1e-9)
    assert output.components["image_inclusion"].item() == pytest.approx(0.5 * image_term, rel=1e-9)
    assert output.components["partial_inclusion"].item() == pytest.approx(0.25 * partial_term, rel=1e-9)
    assert output.loss.item() == pytest.approx(matching + 0.5 * image_term + 0.25 * partial_term, rel=1e-9)


def test_inclusion_mask_replaces_the_positives_in_the_image_inclusion_term_only():
    image_mean, image_log = _gaussians(3, 7)
    text_mean, text_log = _gaussians(3, 8)
    positives = torch.eye(3, dtype=torch.bool)
    included = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.bool)  # captions 0 and 2 share a text
    a, b = torch.tensor(2.0), torch.tensor(1.0)
    loss = build_loss("prolip", vib_beta=0.0, pseudo_positive_weight=0.0, image_inclusion_weight=1.0,
                      partial_inclusion_weight=0.0, gamma=4.0)
    image = ProbabilisticEmbedding(mean=image_mean, log_sigma2=image_log)
    text = ProbabilisticEmbedding(mean=text_mean, log_sigma2=text_log)
    output = loss(image, text, positives, negative_scale=a, shift=b, inclusion_mask=included)

    def incl(i, j):
        s = image_log[i].exp() / 4.0 + text_log[j].exp()
        return float((0.5 * (s.log() + (image_mean[i] - text_mean[j]).pow(2) / s)).mean())

    pairs = [(0, 0), (0, 2), (1, 1), (2, 0), (2, 2)]
    assert output.components["image_inclusion"].item() == pytest.approx(sum(incl(i, j) for i, j in pairs) / 5, rel=1e-9)
    matching = _brute_csd_loss(image_mean, image_log.exp(), text_mean, text_log.exp(), positives.double(), 2.0, 1.0)
    assert output.components["matching"].item() == pytest.approx(matching, rel=1e-9)


def test_duplicate_caption_inclusion_needs_the_prolip_loss():
    with pytest.raises(ValueError, match="duplicate_caption_inclusion"):
        load_recipe(REPO / "configs" / "shapes_pcmepp.yaml", ["train.duplicate_caption_inclusion=true"])
    assert load_recipe(REPO / "configs" / "shapes_prolip_dupincl.yaml").train.duplicate_caption_inclusion


def test_prolip_loss_refuses_partial_text_without_its_source():
    mean, log = _gaussians(2, 5)
    embedding = ProbabilisticEmbedding(mean=mean, log_sigma2=log)
    with pytest.raises(ValueError, match="partial_source"):
        build_loss("prolip")(embedding, embedding, negative_scale=torch.tensor(1.0), shift=torch.tensor(0.0),
                             partial_text=embedding)


# --------------------------------------------------------------------------- CSD on points, soft targets
def test_csd_loss_on_point_embeddings_is_the_zero_variance_csd():
    image_mean, _ = _gaussians(3, 6)
    text_mean, _ = _gaussians(3, 7)
    loss = build_loss("pcme++", vib_beta=1e-2, pseudo_positive_weight=0.0, point_embeddings=True)
    output = loss(ProbabilisticEmbedding(mean=image_mean), ProbabilisticEmbedding(mean=text_mean),
                  negative_scale=torch.tensor(4.0), shift=torch.tensor(1.0))
    zeros = torch.zeros(3, DIM, dtype=torch.float64)
    expected = _brute_csd_loss(image_mean, zeros, text_mean, zeros, torch.eye(3), 4.0, 1.0)
    assert set(output.components) == {"matching"}  # no variance, no VIB
    assert output.loss.item() == pytest.approx(expected, rel=1e-9)


def test_csd_loss_uses_soft_targets_in_the_matching_term():
    image_mean, image_log = _gaussians(2, 8)
    text_mean, text_log = _gaussians(3, 9)
    mask = torch.tensor([[1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    output = build_loss("pcme++", vib_beta=0.0, pseudo_positive_weight=0.0)(
        ProbabilisticEmbedding(mean=image_mean, log_sigma2=image_log),
        ProbabilisticEmbedding(mean=text_mean, log_sigma2=text_log), mask,
        negative_scale=torch.tensor(2.0), shift=torch.tensor(1.0), soft_targets=soft)
    expected = _brute_csd_loss(image_mean, image_log.exp(), text_mean, text_log.exp(), soft, 2.0, 1.0)
    assert output.loss.item() == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="soft_targets"):
        build_loss("pcme++")(ProbabilisticEmbedding(mean=image_mean, log_sigma2=image_log),
                             ProbabilisticEmbedding(mean=text_mean, log_sigma2=text_log), mask,
                             negative_scale=torch.tensor(2.0), shift=torch.tensor(1.0), soft_targets=soft + 0.5)


# --------------------------------------------------------------------------- word dropping
def test_drop_words_keeps_an_ordered_subsequence_with_at_least_one_word():
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 0], [11, 12, 0, 0, 0, 0], [99, 21, 22, 23, 98, 0]])
    attention = (input_ids != 0).long()
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids, mask = drop_words(input_ids, attention, 0.6, protected_ids=(98, 99), generator=generator)
        assert ids.shape == input_ids.shape and mask.shape == attention.shape
        for row in range(3):
            original = input_ids[row][attention[row].bool()].tolist()
            kept = ids[row][mask[row].bool()].tolist()
            assert mask[row].tolist() == sorted(mask[row].tolist(), reverse=True)  # packed to the left
            assert (ids[row][~mask[row].bool()] == 0).all()  # the rest is padding
            iterator = iter(original)
            assert all(token in iterator for token in kept)  # an ordered subsequence
            words = [t for t in kept if t not in (98, 99)]
            assert len(words) >= 1
            if row == 2:
                assert kept[0] == 99 and kept[-1] == 98  # special tokens are never dropped


def test_drop_words_with_probability_zero_changes_nothing_and_drops_about_p():
    input_ids = torch.arange(1, 201).reshape(2, 100)
    attention = torch.ones_like(input_ids)
    ids, mask = drop_words(input_ids, attention, 0.0)
    assert torch.equal(ids, input_ids) and torch.equal(mask, attention)
    _, mask = drop_words(input_ids, attention, 0.5, generator=torch.Generator().manual_seed(1))
    assert 70 <= int(mask.sum()) <= 130


# --------------------------------------------------------------------------- mixing
def test_mix_images_soft_targets_match_the_mixed_pixels():
    num = 8
    # Image i is the constant i: a mixed image's mean pixel is sum_j target[i, j] * j (diagonal mask).
    pixels = torch.arange(num, dtype=torch.float64).reshape(num, 1, 1, 1).expand(num, 3, 16, 16).clone()
    mask = torch.eye(num, dtype=torch.bool)
    for cutmix_prob in (0.0, 1.0):
        mixed, targets = mix_images(pixels, mask, 0.5, cutmix_prob=cutmix_prob,
                                    generator=torch.Generator().manual_seed(3))
        assert torch.equal(mixed[4:], pixels[4:]) and torch.equal(targets[4:], mask[4:].double())
        for row in range(4):
            assert targets[row].sum().item() == pytest.approx(1.0)
            assert targets[row, row] > 0 and (targets[row] > 0).sum() <= 2
            expected_mean = float((targets[row] * torch.arange(num, dtype=torch.float64)).sum())
            assert mixed[row].mean().item() == pytest.approx(expected_mean, rel=1e-9)


# --------------------------------------------------------------------------- duplicate positives
def test_duplicate_caption_mask_on_a_hand_built_batch():
    # rows: (image 10, "some shapes"), (image 11, "a red shape"), (image 12, "some shapes"), (image 10, "a circle")
    input_ids = torch.tensor([[3, 4, 0], [5, 6, 7], [3, 4, 0], [8, 9, 0]])
    attention = (input_ids != 0).long()
    keys = caption_keys(input_ids, attention)
    mask = duplicate_caption_mask(torch.tensor([10, 11, 12, 10]), keys)
    expected = torch.tensor([[1, 0, 1, 1],
                             [0, 1, 0, 0],
                             [1, 0, 1, 0],
                             [1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_caption_keys_ignore_padding_length():
    short = caption_keys(torch.tensor([[3, 4]]), torch.ones(1, 2, dtype=torch.long))
    padded = caption_keys(torch.tensor([[3, 4, 0, 0]]), torch.tensor([[1, 1, 0, 0]]))
    other = caption_keys(torch.tensor([[4, 3]]), torch.ones(1, 2, dtype=torch.long))
    assert short.item() == padded.item() != other.item()


# --------------------------------------------------------------------------- frozen sigma
def test_frozen_uncertainty_keeps_log_sigma2_constant_after_a_step():
    torch.manual_seed(0)
    model = PCMEModel(tiny_pcme_config(init_log_sigma2=-3.0))
    freeze_uncertainty(model)
    module = ContrastiveTrainingModule(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    pixels = torch.randn(4, 3, 32, 32)
    input_ids = torch.randint(2, 60, (4, 5))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    module(pixel_values=pixels, input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).loss.backward()
    optimizer.step()
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[name], after[name]) for name in before if "uncertainty" not in name)
    for name in before:
        if "uncertainty_branch" in name:
            assert torch.equal(before[name], after[name]), name
    with torch.no_grad():
        text = model.get_text_features(input_ids, torch.ones_like(input_ids))
        image = model.get_image_features(pixels)
    assert torch.allclose(text.log_sigma2, torch.full_like(text.log_sigma2, -3.0))
    assert torch.allclose(image.log_sigma2, torch.full_like(image.log_sigma2, -3.0))


@pytest.mark.parametrize("detach_means", [True, False])
def test_prolip_detach_means_stops_only_the_inclusion_gradient_into_the_means(detach_means):
    image_mean, image_log = _gaussians(2, 10)
    text_mean, text_log = _gaussians(2, 11)

    def gradients(weight: float) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in (image_mean, image_log, text_mean, text_log)]
        loss = build_loss("prolip", vib_beta=0.0, pseudo_positive_weight=0.0, image_inclusion_weight=weight,
                          partial_inclusion_weight=0.0, detach_means=detach_means)
        output = loss(ProbabilisticEmbedding(mean=leaves[0], log_sigma2=leaves[1]),
                      ProbabilisticEmbedding(mean=leaves[2], log_sigma2=leaves[3]),
                      negative_scale=torch.tensor(1.0), shift=torch.tensor(0.0))
        return list(torch.autograd.grad(output.loss, leaves))

    with_inclusion, without = gradients(1.0), gradients(0.0)
    means_unchanged = all(torch.allclose(with_inclusion[k], without[k], rtol=0, atol=1e-12) for k in (0, 2))
    assert means_unchanged == detach_means
    for k in (1, 3):  # the variances always learn from the inclusion term
        assert not torch.allclose(with_inclusion[k], without[k])


def test_uncertainty_lr_multiplier_gets_its_own_groups():
    from hf_pcme.training.optim import parameter_groups

    model = PCMEModel(tiny_pcme_config(init_log_sigma2=-3.0))
    branch_ids = {id(p) for name, p in model.named_parameters() if "uncertainty_branch" in name}
    groups = parameter_groups(model, lr=1.0, weight_decay=0.0, uncertainty_lr_multiplier=10.0)
    for group in groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= branch_ids or not ids & branch_ids
        assert group["lr"] == (10.0 if ids <= branch_ids else 1.0)
    assert sum(len(g["params"]) for g in groups if g["lr"] == 10.0) == len(branch_ids)
    assert len(parameter_groups(model, lr=1.0, weight_decay=0.0)) < len(groups)
