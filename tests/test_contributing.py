"""CONTRIBUTING.md's worked example (the SigLIP loss) is the real file, matches its formula, and plugs in by name."""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_pcme import ProbabilisticEmbedding
from hf_pcme.losses import LOSSES, build_loss
from hf_pcme.loss_siglip import SigmoidPairLoss
from hf_pcme.training.config import load_recipe

REPO_ROOT = Path(__file__).resolve().parent.parent


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_contributing_shows_the_real_loss_file():
    blocks = _python_blocks((REPO_ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8"))
    source = (REPO_ROOT / "src/hf_pcme/loss_siglip.py").read_text(encoding="utf-8")
    assert source in blocks


def test_siglip_registered_by_one_line():
    assert LOSSES["siglip"] is SigmoidPairLoss
    assert isinstance(build_loss("siglip", init_logit_bias=-3.0), SigmoidPairLoss)


def test_siglip_equals_bruteforce_loop_over_pairs():
    torch.manual_seed(0)
    image, text = torch.randn(3, 5), torch.randn(4, 5)
    positive = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    loss = SigmoidPairLoss(init_logit_scale=math.log(4.0), init_logit_bias=-1.5)
    got = loss(ProbabilisticEmbedding(mean=image), ProbabilisticEmbedding(mean=text), positive).loss

    expected = 0.0
    for i in range(3):
        for j in range(4):
            cosine = float(image[i] @ text[j]) / (float(image[i].norm()) * float(text[j].norm()))
            z = 1.0 if positive[i, j] else -1.0
            expected -= math.log(1.0 / (1.0 + math.exp(-z * (4.0 * cosine - 1.5))))
    assert float(got.detach()) == pytest.approx(expected / 3, rel=1e-5)


def test_siglip_gradient_reaches_its_own_parameters():
    loss = SigmoidPairLoss()
    image = ProbabilisticEmbedding(mean=F.normalize(torch.randn(2, 3), dim=-1))
    text = ProbabilisticEmbedding(mean=F.normalize(torch.randn(2, 3), dim=-1))
    loss(image, text).loss.backward()
    assert loss.logit_scale.grad is not None and loss.logit_bias.grad is not None


def test_recipe_accepts_a_registered_loss_without_other_edits():
    recipe = load_recipe(REPO_ROOT / "configs/shapes_deterministic.yaml", ["model.loss_type=siglip"])
    assert recipe.model.loss_type == "siglip"
    with pytest.raises(ValueError, match="model.loss_type.*siglip"):
        load_recipe(REPO_ROOT / "configs/shapes_deterministic.yaml", ["model.loss_type=sigclip"])
