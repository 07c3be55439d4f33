"""Reading the inputs of an original PCME conversion: the checkpoint, the vocabulary and the YAML config.

Part of :mod:`hf_pcme.conversion.pcme_original` (which re-exports every public name here).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

#: The converter's one logger, named after its public module so that one logging setting covers it.
logger = logging.getLogger("hf_pcme.conversion.pcme_original")

SPECIAL_TOKENS = {"pad": "<pad>", "start": "<start>", "end": "<end>", "unk": "<unk>"}
VOCAB_PICKLE_WARNING = (
    "Reading the vocabulary pickle {path}. Unpickling can run code hidden in the file; only plain "
    "dicts, lists, strings and numbers are accepted here, and the result is stored as a plain "
    "tokenizer.json. Convert only files you trust."
)


class ConversionError(ValueError):
    """The checkpoint, vocabulary or config cannot be converted; the message says why."""


def load_original_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, Any]:
    """``torch.load`` of an original checkpoint, with ``weights_only=True`` unless ``allow_pickle``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}.")
    if not zipfile.is_zipfile(path) and not allow_pickle:
        raise ConversionError(
            f"{path} is truncated or not a torch checkpoint (no zip archive, which torch.save writes since torch 1.6). "
            "Download it again; if it is an older pickle checkpoint you trust, pass allow_pickle=True (--allow-pickle)."
        )
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):  # metadata may hold numpy scores
            checkpoint = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error) and not allow_pickle:
            raise ConversionError(
                f"{path} holds Python objects other than tensors and plain containers, which weights-only loading "
                "refuses. If you trust the file, pass allow_pickle=True (--allow-pickle)."
            ) from error
        raise ConversionError(f"{path} is truncated or not a torch checkpoint ({error}). Download it again.") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ConversionError(f"{path} is truncated or not a torch checkpoint ({error}). Download it again.") from error
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint:
        keys = list(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ConversionError(
            f"{path} is not an original PCME checkpoint: expected a dict with 'model' (and 'criterion', 'config', "
            f"'word2idx'), got {keys}."
        )
    return dict(checkpoint)


def _numpy_scalar_globals() -> list[Any]:
    """The numpy objects a pickled numpy scalar refers to (data, not code), for weights-only loading."""
    try:
        import numpy as np
        from numpy._core.multiarray import scalar
    except ImportError:
        return []
    return [scalar, np.dtype, *{type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32", "bool")}]


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles only builtin containers and scalars (no class is ever imported)."""

    def find_class(self, module: str, name: str) -> Any:
        raise ConversionError(
            f"The vocabulary pickle refers to {module}.{name}; only a plain dict {{'idx', 'word2idx', 'idx2word'}} "
            "is accepted. Export word2idx to JSON ({word: id}) with the original code and pass that instead."
        )


def load_vocabulary(path: str | os.PathLike) -> dict[str, int]:
    """``word2idx`` from the original ``*_vocab.pkl`` (a pickled dict) or a JSON file ({word: id} or {"word2idx": ...})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Vocabulary not found: {path}.")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
    else:
        logger.warning(VOCAB_PICKLE_WARNING.format(path=path))
        try:
            data = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
        except ConversionError:
            raise
        except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad file
            raise ConversionError(f"{path} is not a readable vocabulary pickle ({error}).") from error
    if isinstance(data, Mapping) and "word2idx" in data:
        data = data["word2idx"]
    if not isinstance(data, Mapping) or not all(isinstance(k, str) and isinstance(v, int) for k, v in data.items()):
        raise ConversionError(f"{path}: expected a mapping word -> integer id (word2idx).")
    return dict(data)


def load_original_config(path: str | os.PathLike | None, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The original YAML config (``--config``), else the checkpoint's ``config``; returns its ``model`` / ``criterion``."""
    if path is not None:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    else:
        config = checkpoint.get("config")
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        raise ConversionError(
            "No original config with a 'model' section: pass the YAML the checkpoint was trained with "
            "(e.g. config/coco/pcme_coco.yaml)."
        )
    return {"model": dict(config["model"]), "criterion": dict(config.get("criterion") or {})}


__all__ = [
    "SPECIAL_TOKENS",
    "VOCAB_PICKLE_WARNING",
    "ConversionError",
    "load_original_checkpoint",
    "load_original_config",
    "load_vocabulary",
]
