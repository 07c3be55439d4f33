"""Every loss against a brute-force loop over pairs (and samples) written from the formulas of docs/formulas.md."""

from __future__ import annotations

import math

import pytest
import torch

from hf_pcme.distances import sample_gaussian
from hf_pcme.losses import LOSSES, build_loss
from hf_pcme.outputs import ProbabilisticEmbedding

N_IMG, N_TXT, DIM, NUM_SAMPLES = 3, 5, 4, 3
#: image 0 <-> captions 0, 1; image 1 <-> caption 2; image 2 <-> captions 3, 4 (COCO-like multi-positive)
MULTI_POSITIVE = torch.tensor(
    [[1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 1]],
    dtype=torch.bool,
)
MASKS = {"diagonal": None, "multi_positive": MULTI_POSITIVE}


# --------------------------------------------------------------------------- inputs
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_embedding(
    num_items: int, seed: int, *, num_embeds: int = 0, attention_length: int = 0
) -> tuple[ProbabilisticEmbedding, dict[str, torch.Tensor]]:
    """Float64 leaf tensors (mean, log_sigma2) and an embedding whose samples are built from them."""
    shape = (num_items, num_embeds, DIM) if num_embeds else (num_items, DIM)
    mean = torch.nn.functional.normalize(torch.randn(*shape, generator=_gen(seed), dtype=torch.float64), dim=-1)
    mean.requires_grad_()
    leaves = {"mean": mean}
    log_sigma2 = samples = attention = None
    if not num_embeds:
        log_sigma2 = (torch.rand(num_items, DIM, generator=_gen(seed + 1), dtype=torch.float64) * 2 - 3).requires_grad_()
        samples = sample_gaussian(mean, log_sigma2, NUM_SAMPLES, generator=_gen(seed + 2))
        leaves["log_sigma2"] = log_sigma2
    if attention_length:
        scores = torch.randn(num_items, num_embeds, attention_length, generator=_gen(seed + 3), dtype=torch.float64)
        attention = scores.softmax(-1).requires_grad_()
        leaves["attention"] = attention
    return ProbabilisticEmbedding(mean=mean, log_sigma2=log_sigma2, samples=samples, attention=attention), leaves


def make_pair(mask_name: str, **kwargs):
    num_texts = N_IMG if mask_name == "diagonal" else N_TXT
    image, image_leaves = make_embedding(N_IMG, seed=10, **kwargs)
    text, text_leaves = make_embedding(num_texts, seed=20, **kwargs)
    dense_mask = torch.eye(N_IMG, dtype=torch.bool) if mask_name == "diagonal" else MULTI_POSITIVE
    return image, text, dense_mask, image_leaves, text_leaves


def match_parameters(a: float = 1.5, b: float = 1.0):
    return (
        torch.tensor(a, dtype=torch.float64, requires_grad=True),
        torch.tensor(b, dtype=torch.float64, requires_grad=True),
    )


# --------------------------------------------------------------------------- brute-force references
def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def squared_distance(u: torch.Tensor, v: torch.Tensor) -> float:
    return sum((p - q) ** 2 for p, q in zip(u.detach().tolist(), v.detach().tolist()))


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    dot = sum(p * q for p, q in zip(u.detach().tolist(), v.detach().tolist()))
    return dot / math.sqrt(squared_distance(u, 0 * u) * squared_distance(v, 0 * v))


def kl_terms(mean: torch.Tensor, log_sigma2: torch.Tensor) -> list[float]:
    return [
        -0.5 * (1 + s - m**2 - math.exp(s))
        for m_row, s_row in zip(mean.detach().tolist(), log_sigma2.detach().tolist())
        for m, s in zip(m_row, s_row)
    ]


def bce(logit: float, target: float) -> float:
    return -(target * math.log(sigmoid(logit)) + (1 - target) * math.log(1 - sigmoid(logit)))


def brute_pcme_matching(image, text, mask, a: float, b: float) -> float:
    """2 * sum over pairs of -log p(m = m_ij), p = mean over sample pairs of sigmoid(2(-a d + b))."""
    total = 0.0
    for i, image_samples in enumerate(image.samples):
        for j, text_samples in enumerate(text.samples):
            probs = [
                sigmoid(2 * (-a * math.sqrt(squared_distance(u, v) + 1e-6) + b))
                for u in image_samples
                for v in text_samples
            ]
            p = sum(probs) / len(probs)
            total += -math.log(p if mask[i, j] else 1 - p)
    return 2 * total


def brute_uniformity(points: list[torch.Tensor], t: float = 2.0) -> float:
    values = [math.exp(-t * squared_distance(points[i], points[j])) for i in range(len(points)) for j in range(i + 1, len(points))]
    return math.log(sum(values) / len(values))


def brute_pcmepp(image, text, mask, a: float, b: float, beta: float, alpha: float) -> tuple[float, int]:
    n, m = mask.shape
    logits = [
        [
            -a
            * (
                squared_distance(image.mean[i], text.mean[j])
                + sum(math.exp(s) for s in image.log_sigma2[i].tolist())
                + sum(math.exp(s) for s in text.log_sigma2[j].tolist())
            )
            + b
            for j in range(m)
        ]
        for i in range(n)
    ]
    matching = 2 * sum(bce(logits[i][j], float(mask[i, j])) for i in range(n) for j in range(m)) / (n * m)
    kl = sum(kl_terms(image.mean, image.log_sigma2)) / (n * DIM) + sum(kl_terms(text.mean, text.log_sigma2)) / (m * DIM)
    # pseudo-positives: a pair scoring at least as high as (the lowest) ground truth of its query
    i2t_targets = [[float(mask[i, j]) for j in range(m)] for i in range(n)]
    t2i_targets = [[float(mask[i, j]) for j in range(m)] for i in range(n)]
    num_pseudo = 0
    for i in range(n):
        ground_truth = min(logits[i][j] for j in range(m) if mask[i, j])
        for j in range(m):
            if not mask[i, j] and logits[i][j] >= ground_truth:
                i2t_targets[i][j] = 1.0
                num_pseudo += 1
    for j in range(m):
        ground_truth = min(logits[i][j] for i in range(n) if mask[i, j])
        for i in range(n):
            if not mask[i, j] and logits[i][j] >= ground_truth:
                t2i_targets[i][j] = 1.0
                num_pseudo += 1
    pseudo = sum(bce(logits[i][j], i2t_targets[i][j]) + bce(logits[i][j], t2i_targets[i][j]) for i in range(n) for j in range(m))
    return matching + beta * kl + alpha * pseudo / (n * m), num_pseudo


def brute_infonce(image, text, mask, scale: float) -> float:
    n, m = mask.shape
    logits = [[scale * cosine(image.mean[i], text.mean[j]) for j in range(m)] for i in range(n)]

    def direction(rows: list[list[float]], row_mask: list[list[bool]]) -> float:
        losses = []
        for row, positives in zip(rows, row_mask):
            log_normaliser = math.log(sum(math.exp(v) for v in row))
            chosen = [v for v, positive in zip(row, positives) if positive]
            losses.append(-sum(v - log_normaliser for v in chosen) / len(chosen))
        return sum(losses) / len(losses)

    mask_rows = mask.tolist()
    columns = [list(col) for col in zip(*logits)]
    mask_columns = [list(col) for col in zip(*mask_rows)]
    return 0.5 * (direction(logits, mask_rows) + direction(columns, mask_columns))


def brute_triplet(similarity: list[list[float]], mask, margin: float, max_violation: bool) -> float:
    """Sum over positive pairs (i, p), both directions, of the hinge against the negatives of the query."""
    n, m = mask.shape
    total = 0.0
    for i in range(n):
        for p in range(m):
            if not mask[i, p]:
                continue
            i2t = [max(0.0, margin + similarity[i][j] - similarity[i][p]) for j in range(m) if not mask[i, j]]
            t2i = [max(0.0, margin + similarity[k][p] - similarity[i][p]) for k in range(n) if not mask[k, p]]
            for costs in (i2t, t2i):
                total += max(costs, default=0.0) if max_violation else sum(costs)
    return total


# --------------------------------------------------------------------------- per-loss tests
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_pcme_equals_bruteforce_over_pairs_and_samples(mask_name):
    image, text, dense_mask, *_ = make_pair(mask_name)
    a, b = match_parameters()
    loss_fn = build_loss("pcme", vib_beta=0.01, uniformity_weight=10.0)
    output = loss_fn(image, text, MASKS[mask_name], negative_scale=a, shift=b)
    matching = brute_pcme_matching(image, text, dense_mask, 1.5, 1.0)
    kl = sum(kl_terms(image.mean, image.log_sigma2)) + sum(kl_terms(text.mean, text.log_sigma2))
    points = [z for item in image.samples for z in item] + [z for item in text.samples for z in item]
    expected = matching + 0.01 * kl + 10.0 * brute_uniformity(points)
    assert math.isclose(output.loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(output.components["matching"].item(), matching, rel_tol=1e-6)


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_pcmepp_equals_bruteforce_with_pseudo_positives(mask_name):
    image, text, dense_mask, *_ = make_pair(mask_name)
    a, b = match_parameters(a=0.8, b=4.0)
    output = build_loss("pcme++", vib_beta=0.1, pseudo_positive_weight=0.1)(
        image, text, MASKS[mask_name], negative_scale=a, shift=b
    )
    expected, num_pseudo = brute_pcmepp(image, text, dense_mask, 0.8, 4.0, beta=0.1, alpha=0.1)
    assert num_pseudo > 0  # the pseudo-positive branch is exercised
    assert math.isclose(output.loss.item(), expected, rel_tol=1e-6)


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_infonce_equals_bruteforce_with_uniform_targets_over_positives(mask_name):
    image, text, dense_mask, *_ = make_pair(mask_name)
    output = build_loss("infonce")(image, text, MASKS[mask_name])
    assert math.isclose(output.loss.item(), brute_infonce(image, text, dense_mask, 1 / 0.07), rel_tol=1e-5)


def test_infonce_scale_is_clamped_at_max_logit_scale():
    image, text, dense_mask, *_ = make_pair("diagonal")
    output = build_loss("infonce", init_logit_scale=math.log(1000.0), max_logit_scale=100.0)(image, text)
    assert math.isclose(output.loss.item(), brute_infonce(image, text, dense_mask, 100.0), rel_tol=1e-5)


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("mask_name", list(MASKS))
def test_vsepp_equals_bruteforce_and_never_uses_a_positive_as_negative(mask_name, max_violation):
    image, text, dense_mask, *_ = make_pair(mask_name)
    output = build_loss("vsepp", margin=0.2, max_violation=max_violation)(image, text, MASKS[mask_name])
    similarity = [[cosine(u, v) for v in text.mean] for u in image.mean]
    expected = brute_triplet(similarity, dense_mask, 0.2, max_violation)
    assert expected > 0
    assert math.isclose(output.loss.item(), expected, rel_tol=1e-6)


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_pvse_equals_bruteforce_mil_triplet_diversity_and_mmd(mask_name):
    image, text, dense_mask, *_ = make_pair(mask_name, num_embeds=2, attention_length=6)
    output = build_loss("pvse", margin=0.1, diversity_weight=0.1, mmd_weight=0.01, mmd_gamma=0.5)(
        image, text, MASKS[mask_name]
    )
    similarity = [
        [max(cosine(u_k, v_k) for u_k in u for v_k in v) for v in text.mean] for u in image.mean
    ]
    ranking = brute_triplet(similarity, dense_mask, 0.1, True) / int(dense_mask.sum())

    def diversity(attention: torch.Tensor) -> float:
        per_item = []
        for maps in attention:
            rows = [row / math.sqrt(squared_distance(row, 0 * row)) for row in maps]
            k = len(rows)
            per_item.append(
                sum((float((rows[p] * rows[q]).sum().detach()) - (p == q)) ** 2 for p in range(k) for q in range(k))
                / k**2
            )
        return sum(per_item) / len(per_item)

    def mean_kernel(xs, ys) -> float:
        return sum(math.exp(-0.5 * squared_distance(x, y)) for x in xs for y in ys) / (len(xs) * len(ys))

    xs = [e for item in image.mean for e in item]
    ys = [e for item in text.mean for e in item]
    mmd = mean_kernel(xs, xs) + mean_kernel(ys, ys) - 2 * mean_kernel(xs, ys)
    expected = ranking + 0.1 * (diversity(image.attention) + diversity(text.attention)) + 0.01 * mmd
    assert math.isclose(output.loss.item(), expected, rel_tol=1e-6)
    assert set(output.components) == {"triplet", "diversity", "mmd"}


def test_center_loss_equals_bruteforce_distance_to_class_centres():
    image, text, *_ = make_pair("multi_positive")
    loss_fn = build_loss("center", num_classes=4, embed_dim=DIM)
    labels = torch.tensor([0, 3, 1] + [0, 0, 3, 1, 1])  # image labels, then caption labels
    output = loss_fn(image, text, MULTI_POSITIVE, labels=labels)
    centres = loss_fn.centers.detach()
    expected = sum(squared_distance(image.mean[i], centres[labels[i]]) for i in range(N_IMG)) / N_IMG
    expected += sum(squared_distance(text.mean[j], centres[labels[N_IMG + j]]) for j in range(N_TXT)) / N_TXT
    assert math.isclose(output.loss.item(), expected, rel_tol=1e-6)


# --------------------------------------------------------------------------- gradients
def test_pcme_gradients_reach_mean_log_sigma2_and_match_parameters():
    image, text, _, image_leaves, text_leaves = make_pair("multi_positive")
    a, b = match_parameters()
    build_loss("pcme", vib_beta=1e-3)(image, text, MULTI_POSITIVE, negative_scale=a, shift=b).loss.backward()
    for tensor in (*image_leaves.values(), *text_leaves.values(), a, b):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_pcmepp_gradients_reach_mean_log_sigma2_and_match_parameters():
    image, text, _, image_leaves, text_leaves = make_pair("multi_positive")
    a, b = match_parameters()
    build_loss("pcme++")(image, text, MULTI_POSITIVE, negative_scale=a, shift=b).loss.backward()
    for tensor in (*image_leaves.values(), *text_leaves.values(), a, b):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


@pytest.mark.parametrize("name, kwargs", [("infonce", {}), ("vsepp", {}), ("pvse", {}), ("center", {"num_classes": 3})])
def test_non_probabilistic_losses_train_the_means_and_their_own_parameters(name, kwargs):
    polysemous = {"num_embeds": 2, "attention_length": 5} if name == "pvse" else {}
    image, text, _, image_leaves, text_leaves = make_pair("diagonal", **polysemous)
    loss_fn = build_loss(name, embed_dim=DIM, **kwargs)
    loss_fn(image, text, labels=torch.tensor([0, 2, 1])).loss.backward()
    for tensor in (image_leaves["mean"], text_leaves["mean"], *loss_fn.parameters()):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    if name == "pvse":
        assert image_leaves["attention"].grad.abs().sum() > 0


# --------------------------------------------------------------------------- shared behaviour
def test_components_are_detached_terms_that_sum_to_the_loss():
    image, text, *_ = make_pair("diagonal")
    a, b = match_parameters()
    output = build_loss("pcme", vib_beta=1e-2, uniformity_weight=1.0)(image, text, negative_scale=a, shift=b)
    assert set(output.components) == {"matching", "vib", "uniformity"}
    assert all(not value.requires_grad for value in output.components.values())
    assert math.isclose(sum(v.item() for v in output.components.values()), output.loss.item(), rel_tol=1e-9)


def test_only_pcme_losses_use_the_match_parameters():
    assert {name for name, cls in LOSSES.items() if cls.uses_match_parameters} == {"pcme", "pcme++", "prolip",
                                                                                  "infonce_inclusion"}


@pytest.mark.parametrize("name", ["pcme", "pcme++"])
def test_probabilistic_losses_require_negative_scale_and_shift(name):
    image, text, *_ = make_pair("diagonal")
    with pytest.raises(ValueError, match="negative_scale"):
        build_loss(name)(image, text, negative_scale=None, shift=torch.tensor(1.0))


@pytest.mark.parametrize("name, missing", [("pcme", "samples"), ("pcme++", "log_sigma2")])
def test_deterministic_embeddings_are_refused_with_a_hint(name, missing):
    mean = torch.nn.functional.normalize(torch.randn(3, DIM), dim=-1)
    point = ProbabilisticEmbedding(mean=mean)
    a, b = match_parameters()
    with pytest.raises(ValueError, match=rf"{missing}.*head_type=\"probabilistic\""):
        build_loss(name)(point, point, negative_scale=a, shift=b)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize(
    "bad_mask",
    [torch.ones(N_IMG, N_IMG + 1, dtype=torch.bool), torch.eye(N_IMG, dtype=torch.long)],
    ids=["shape", "dtype"],
)
def test_bad_positive_mask_is_refused_naming_positive_mask(name, bad_mask):
    polysemous = {"num_embeds": 2, "attention_length": 5} if name == "pvse" else {}
    image, text, *_ = make_pair("diagonal", **polysemous)
    a, b = match_parameters()
    loss_fn = build_loss(name, embed_dim=DIM, **({"num_classes": 3} if name == "center" else {}))
    with pytest.raises(ValueError, match="positive_mask"):
        loss_fn(image, text, bad_mask, negative_scale=a, shift=b, labels=torch.tensor([0, 1, 2]))


def test_default_mask_needs_as_many_images_as_captions():
    image, text, *_ = make_pair("multi_positive")
    with pytest.raises(ValueError, match="positive_mask"):
        build_loss("vsepp")(image, text)


def test_center_loss_requires_labels():
    image, text, *_ = make_pair("diagonal")
    with pytest.raises(ValueError, match="labels"):
        build_loss("center", num_classes=3, embed_dim=DIM)(image, text)


def test_build_loss_unknown_name_lists_the_choices():
    with pytest.raises(ValueError) as error:
        build_loss("triplet")
    for choice in LOSSES:
        assert choice in str(error.value)


def test_build_loss_names_unknown_and_accepted_kwargs():
    with pytest.raises(ValueError) as error:
        build_loss("vsepp", margn=0.3)
    message = str(error.value)
    assert "margn" in message and "margin" in message and "max_violation" in message


def test_build_loss_passes_embed_dim_only_where_accepted_and_reports_missing_kwargs():
    assert build_loss("pcme", embed_dim=16).vib_beta == 1e-5
    assert build_loss("center", num_classes=2, embed_dim=16).centers.shape == (2, 16)
    with pytest.raises(ValueError, match="num_classes"):
        build_loss("center", embed_dim=16)
