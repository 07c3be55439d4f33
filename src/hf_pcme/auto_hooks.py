"""Clearer loading errors from the Auto classes and ``pipeline`` for models saved by this package.

``AutoModel.from_pretrained(folder)`` and ``pipeline(..., model=folder)`` read the folder's config
through ``AutoConfig.from_pretrained``. For a local folder without ``config.json`` transformers says
"Unrecognized model ... Should have a `model_type` key in its config.json", which sends the user
looking for a key in a file that is not there. :func:`install` (called by ``import hf_pcme``) wraps
``AutoConfig.from_pretrained`` so that exactly this case raises ``FileNotFoundError("config.json not
found in <folder> ...")``; every other call, and every other error, is passed through unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

from transformers import AutoConfig

from .modeling_pcme import missing_config_error

_MARK = "_hf_pcme_names_missing_config"


def install() -> None:
    """Wrap ``AutoConfig.from_pretrained`` once (idempotent)."""
    original = AutoConfig.from_pretrained.__func__
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def from_pretrained(cls: type, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(cls, pretrained_model_name_or_path, *args, **kwargs)
        except (ValueError, OSError) as error:
            missing = missing_config_error(pretrained_model_name_or_path, kwargs.get("subfolder"))
            if missing is not None:
                raise missing from error
            raise

    setattr(from_pretrained, _MARK, True)
    AutoConfig.from_pretrained = classmethod(from_pretrained)


__all__ = ["install"]
