"""Registry of the training losses: ``loss_type`` name -> class, and :func:`build_loss`.

Adding a loss is one ``loss_<name>.py`` file (an ``nn.Module`` with the shared ``forward``
signature, see :mod:`.loss_common`) plus one line here.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .loss_center import CrossModalCenterLoss
from .loss_csd import ClosedFormSampledDistanceLoss
from .loss_decoupled_inclusion import DecoupledInclusionLoss
from .loss_graph_pattern import GraphPatternLoss
from .loss_inclusion import InclusionCSDLoss
from .loss_infonce import InfoNCELoss
from .loss_pairwise_similarity import PairwiseSimilarityLoss
from .loss_pvse import PolysemousTripletLoss
from .loss_sampled_contrastive import SampledContrastiveLoss
from .loss_siglip import SigmoidPairLoss
from .loss_triplet import HardestNegativeTripletLoss
from .registry import lookup

LOSSES: dict[str, type[nn.Module]] = {
    "pcme": SampledContrastiveLoss,
    "pcme++": ClosedFormSampledDistanceLoss,
    "infonce": InfoNCELoss,
    "vsepp": HardestNegativeTripletLoss,
    "pvse": PolysemousTripletLoss,
    "center": CrossModalCenterLoss,
    "siglip": SigmoidPairLoss,
    "prolip": InclusionCSDLoss,
    "infonce_inclusion": DecoupledInclusionLoss,
    "pairwise_similarity": PairwiseSimilarityLoss,
    "graph_pattern": GraphPatternLoss,
}

#: Keyword arguments the model supplies for every loss; each loss receives only those it accepts.
MODEL_PROVIDED_KWARGS = ("embed_dim",)


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the loss registered as ``name`` with its hyper-parameters ``kwargs``.

    ``embed_dim`` (passed by the model) is forwarded only to losses that take it. Unknown or
    missing hyper-parameters raise a ``ValueError`` listing the accepted ones.

    >>> build_loss("vsepp", margin=0.2).margin
    0.2
    """
    loss_class = lookup(LOSSES, name, "loss")
    parameters = {
        parameter_name: parameter
        for parameter_name, parameter in inspect.signature(loss_class.__init__).parameters.items()
        if parameter_name != "self" and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    }
    for model_kwarg in MODEL_PROVIDED_KWARGS:
        if model_kwarg not in parameters:
            kwargs.pop(model_kwarg, None)
    accepted = ", ".join(parameters) or "(none)"
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise ValueError(f"Unknown argument(s) {', '.join(unknown)} for loss {name!r}; it accepts: {accepted}.")
    missing = [
        parameter_name
        for parameter_name, parameter in parameters.items()
        if parameter.default is inspect.Parameter.empty and parameter_name not in kwargs
    ]
    if missing:
        raise ValueError(
            f"Loss {name!r} needs argument(s) {', '.join(missing)} (pass them in loss_kwargs); it accepts: {accepted}."
        )
    return loss_class(**kwargs)
