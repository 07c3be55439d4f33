"""Optimiser, learning-rate schedule and tower freezing for the two training phases of PCME.

PCME (Chun et al., CVPR 2021) trains in two phases: first with the pretrained image backbone
frozen (only the heads, the text tower and ``a``, ``b`` learn), then everything fine-tuned. Each
phase gets a fresh optimiser (AdamP when the ``adamp`` package is installed, as in the original,
else AdamW) and a schedule of linear warmup then cosine decay,

    lr(t) = lr * t / warmup                                    for t < warmup
    lr(t) = lr * (r + (1 - r) * (1 + cos(pi * (t - warmup) / (T - warmup))) / 2)   after,

with ``r = min_lr_ratio`` and ``T`` the phase's steps.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup

#: Attribute names of the two towers on :class:`~hf_pcme.PCMEModel`, by the names used in recipes.
TOWER_ATTRIBUTES = {"vision": "vision_model", "text": "text_model"}
#: What ``train.phase1_frozen`` may list: a tower, or only the text tower's word embeddings
#: (PCME freezes the GloVe vectors in phase 1 but trains its bi-GRU).
FREEZABLE = ("vision", "text", "word_embeddings")


def adamp_available() -> bool:
    """Whether the ``adamp`` package (AdamP, Heo et al. ICLR 2021, used by PCME) is importable."""
    return importlib.util.find_spec("adamp") is not None


def tower_modules(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """The sub-modules of ``model`` for recipe names ``"vision"``, ``"text"``, ``"word_embeddings"``."""
    modules = []
    for name in names:
        if name == "word_embeddings":
            embeddings = model.text_model.get_input_embeddings()
            if embeddings is None:  # e.g. the text GCN, whose word vectors are fixed buffers
                raise ValueError(
                    "train.phase1_frozen lists 'word_embeddings' but the text tower has no trainable word "
                    "embeddings; remove it (freeze 'text' to freeze the whole tower)."
                )
            modules.append(embeddings)
        elif name in TOWER_ATTRIBUTES:
            modules.append(getattr(model, TOWER_ATTRIBUTES[name]))
        else:
            raise ValueError(f"Unknown part to freeze {name!r}; valid choices are: {', '.join(FREEZABLE)}.")
    return modules


def freeze_towers(model: nn.Module, frozen: Iterable[str]) -> None:
    """Make the listed towers untrainable and every other parameter trainable again.

    "Trainable" means trainable when first seen here: parameters the model itself keeps out of
    training (e.g. ``a`` and ``b`` when the loss does not use them) stay untrainable in every
    phase. Frozen towers are also put in eval mode (BatchNorm statistics stay those of the
    pretrained weights); :func:`apply_frozen_eval_mode` re-applies that after ``model.train()``.
    """
    frozen = list(frozen)
    if not hasattr(model, "_hf_pcme_trainable"):
        model._hf_pcme_trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen_ids = {id(p) for module in tower_modules(model, frozen) for p in module.parameters()}
    for name, param in model.named_parameters():
        param.requires_grad_(name in model._hf_pcme_trainable and id(param) not in frozen_ids)
    model._hf_pcme_frozen_towers = frozen  # read by apply_frozen_eval_mode
    apply_frozen_eval_mode(model)


def freeze_uncertainty(model: nn.Module) -> None:
    """Fix every log variance at its initial value: the "without uncertainty" ablation of PCME.

    The projections of each uncertainty branch are zeroed, so ``log_sigma2`` is the branch's bias
    (``init_log_sigma2``) for every input, and the whole branch is made untrainable. Call it before
    the first :func:`freeze_towers`, which then keeps the branch frozen in every phase.
    """
    from ..heads import UncertaintyBranch

    branches = [module for module in model.modules() if isinstance(module, UncertaintyBranch)]
    if not branches:
        raise ValueError("freeze_uncertainty needs a probabilistic head (head_type='probabilistic'); "
                         "this model has no uncertainty branch.")
    with torch.no_grad():
        for branch in branches:
            branch.local_proj.weight.zero_()
            branch.global_proj.weight.zero_()
            branch.requires_grad_(False)
    if hasattr(model, "_hf_pcme_trainable"):
        branch_ids = {id(p) for branch in branches for p in branch.parameters()}
        model._hf_pcme_trainable -= {name for name, p in model.named_parameters() if id(p) in branch_ids}


def apply_frozen_eval_mode(model: nn.Module) -> None:
    """Put the towers frozen by :func:`freeze_towers` in eval mode (call after ``model.train()``)."""
    for module in tower_modules(model, getattr(model, "_hf_pcme_frozen_towers", [])):
        module.eval()


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, tower_lr_multiplier: float = 1.0,
    uncertainty_lr_multiplier: float = 1.0,
) -> list[dict]:
    """Trainable parameters in groups: (towers | uncertainty branches | rest) x (decayed | not decayed).

    Biases, normalisation weights and scalars (``a``, ``b``) are not decayed; tower parameters
    use ``lr * tower_lr_multiplier``, the heads' uncertainty branches ``lr * uncertainty_lr_multiplier``.
    """
    from ..heads import UncertaintyBranch

    tower_ids = {id(p) for module in tower_modules(model, TOWER_ATTRIBUTES) for p in module.parameters()}
    # Without a multiplier of their own, the uncertainty branches stay in the groups of the rest.
    uncertainty_ids = {id(p) for module in model.modules() if isinstance(module, UncertaintyBranch)
                       for p in module.parameters()} if uncertainty_lr_multiplier != 1.0 else set()
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.dim() < 2 or name.endswith(".bias")
        kind = 1 if id(param) in tower_ids else 2 if id(param) in uncertainty_ids else 0
        groups.setdefault((kind, no_decay), []).append(param)
    multipliers = {0: 1.0, 1: tower_lr_multiplier, 2: uncertainty_lr_multiplier}
    return [
        {"params": params, "lr": lr * multipliers[kind], "weight_decay": 0.0 if no_decay else weight_decay}
        for (kind, no_decay), params in sorted(groups.items())
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    tower_lr_multiplier: float = 1.0,
    name: str = "auto",
    uncertainty_lr_multiplier: float = 1.0,
) -> torch.optim.Optimizer:
    """AdamP (``name="adamp"``, or ``"auto"`` when installed) or AdamW over the trainable parameters."""
    groups = parameter_groups(model, lr, weight_decay, tower_lr_multiplier, uncertainty_lr_multiplier)
    if not groups:
        raise ValueError("The model has no trainable parameters in this phase; check train.phase1_frozen.")
    if name == "adamp" or (name == "auto" and adamp_available()):
        if not adamp_available():
            raise ValueError("train.optimizer is 'adamp' but the adamp package is not installed (pip install adamp).")
        from adamp import AdamP

        return AdamP(groups, lr=lr, weight_decay=weight_decay)
    if name not in ("auto", "adamw"):
        raise ValueError(f"Unknown optimizer {name!r}; valid choices are: auto, adamw, adamp.")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_steps`` then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(int(warmup_steps), total_steps - 1) if total_steps > 1 else 0
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps, min_lr_rate=min_lr_ratio
    )


__all__ = [
    "FREEZABLE",
    "TOWER_ATTRIBUTES",
    "adamp_available",
    "apply_frozen_eval_mode",
    "build_optimizer",
    "build_scheduler",
    "freeze_towers",
    "freeze_uncertainty",
    "parameter_groups",
    "tower_modules",
]
