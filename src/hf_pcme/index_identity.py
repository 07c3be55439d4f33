"""Which model made an index: :func:`model_fingerprint`, and the search score it ranks by (:func:`default_metric`)."""

from __future__ import annotations

import hashlib

import torch

from .heads import MULTI_EMBEDDING_HEADS
from .scoring import default_search_score


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short string that identifies which model produced an index's embeddings.

    ``"<head_type>-K<num_embeds>-D<embed_dim>-<sha256 of the projection heads>"``: the config's
    head type, K and D, plus a hash of the names, shapes and float32 values of the parameters
    of the two projection heads (``image_head``, ``text_head``; all parameters for a model
    without them). Two models give the same fingerprint iff their heads are identical, which is
    what decides whether stored embeddings and fresh query embeddings live in the same space.
    """
    config = getattr(model, "config", None)
    head_type = getattr(config, "head_type", "unknown")
    num_embeds = getattr(config, "num_embeds", 1) if head_type in MULTI_EMBEDDING_HEADS else 1
    embed_dim = getattr(config, "embed_dim", "unknown")
    heads = [getattr(model, name) for name in ("image_head", "text_head") if hasattr(model, name)]
    named = [
        (f"{i}.{name}", param) for i, head in enumerate(heads or [model]) for name, param in head.named_parameters()
    ]
    digest = hashlib.sha256()
    for name, param in named:
        digest.update(f"{name}:{tuple(param.shape)};".encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return f"{head_type}-K{num_embeds}-D{embed_dim}-{digest.hexdigest()[:16]}"


def default_metric(model: torch.nn.Module) -> str:
    """The search score that matches how a model was trained: ``hf_pcme.scoring.default_search_score``.

    ``"csd"`` for probabilistic heads trained with the closed-form distance (PCME++,
    ``match_function="csd"``), ``"cosine"`` otherwise (PCME ranks by the inner product of the
    sample means, VSE++ / InfoNCE / PVSE by the cosine).
    """
    return default_search_score(getattr(model, "config", None))


def check_compatible(
    index_fingerprint: str | None, index_embed_dim: int, model_fingerprint: str | None, embed_dim: int | None
) -> None:
    """Raise a ``ValueError`` if an index was built by another model or for another embedding size.

    A ``None`` argument (or an index without a fingerprint) is not checked.
    """
    if embed_dim is not None and int(embed_dim) != index_embed_dim:
        raise ValueError(
            f"The index holds {index_embed_dim}-d embeddings but the model makes {embed_dim}-d ones: "
            "rebuild the index with this model (CrossModalIndex.build)."
        )
    if model_fingerprint is not None and index_fingerprint is not None:
        if model_fingerprint != index_fingerprint:
            raise ValueError(
                f"The index was built by a different model (fingerprint {index_fingerprint!r}, this model: "
                f"{model_fingerprint!r}); its embeddings are not comparable with this model's queries. "
                "Rebuild the index with this model (CrossModalIndex.build)."
            )


__all__ = ["check_compatible", "default_metric", "model_fingerprint"]
