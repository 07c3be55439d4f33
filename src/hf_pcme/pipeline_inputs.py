"""Query normalisation of the cross-modal-retrieval pipeline: ``images=`` / ``texts=`` (and their aliases) to one list.

Shipped as remote code with the pipeline (:mod:`hf_pcme.pipeline_cross_modal_retrieval`): flat, relative imports only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def query_aliases(images: Any, texts: Any, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """Accept the processor's names ``image=`` / ``text=`` for ``images=`` / ``texts=`` (popped from ``kwargs``)."""
    for alias, name, value in (("image", "images", images), ("text", "texts", texts)):
        if alias in kwargs:
            if value is not None:
                raise ValueError(f"Give {name}= or {alias}= (the same argument), not both.")
            if name == "images":
                images = kwargs.pop(alias)
            else:
                texts = kwargs.pop(alias)
    return images, texts


def query_list(images: Any, texts: Any) -> tuple[list, str, bool]:
    """The query list, its modality and whether a single query (not a list) was given."""
    if images is not None and texts is not None:
        raise ValueError("Give either images= or texts=, not both: one query modality per call.")
    if images is None and texts is None:
        raise ValueError("No query: pass images=[...] (PIL images or local paths) or texts=[...] (captions).")
    if texts is not None:
        single = isinstance(texts, str)
        queries = [texts] if single else list(texts)
        if not queries:
            raise ValueError("texts is empty: give at least one caption.")
        bad = [type(t).__name__ for t in queries if not isinstance(t, str)]
        if bad:
            raise ValueError(f"texts must be captions (str); got {bad[0]}. Images go in images=.")
        return queries, "text", single
    single = not isinstance(images, (list, tuple))
    queries = [images] if single else list(images)
    if not queries:
        raise ValueError("images is empty: give at least one image.")
    from PIL import Image

    bad = [type(i).__name__ for i in queries if not isinstance(i, (Image.Image, str, Path))]
    if bad:
        raise ValueError(f"images must be PIL images or local paths; got {bad[0]}. Captions go in texts=.")
    return queries, "image", single


__all__ = ["query_aliases", "query_list"]
