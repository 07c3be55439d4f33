"""The files of a saved :class:`~hf_pcme.index.CrossModalIndex`: JSON, safetensors and FAISS's own format.

- ``index_config.json``: format version, sizes, metric, back end, FAISS index type and options
  (``nlist``, ``nprobe``, ``ann``), the model fingerprint;
- ``ids.json``: ids and texts;
- ``embeddings.safetensors``: ``mean`` (unless FAISS stores the exact vectors itself: flat,
  IVF-Flat, HNSW), ``log_sigma2``, ``attention``;
- ``index.faiss``: ``faiss.write_index`` of a FAISS back end.

Nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "index_config.json"
IDS_NAME = "ids.json"
EMBEDDINGS_NAME = "embeddings.safetensors"
FAISS_NAME = "index.faiss"
FORMAT_VERSION = 1


def write_index_files(
    directory: Path, config: dict[str, Any], ids: list, texts: list[str] | None, tensors: dict[str, torch.Tensor]
) -> None:
    """Write the config, the ids / texts and the tensors (the caller writes ``index.faiss``)."""
    tensors = {name: tensor.cpu().contiguous() for name, tensor in tensors.items() if tensor is not None}
    if tensors:
        save_file(tensors, str(directory / EMBEDDINGS_NAME), metadata={"format": "pt"})
    config = {"format_version": FORMAT_VERSION, **config}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (directory / IDS_NAME).write_text(json.dumps({"ids": ids, "texts": texts}), encoding="utf-8")


def read_index_files(directory: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, {"ids", "texts"}, tensors)`` of a directory written by :func:`write_index_files`."""
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in {directory}: not a directory written by CrossModalIndex.save."
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"Unsupported index format_version {config.get('format_version')!r} (expected {FORMAT_VERSION})."
        )
    names = json.loads((directory / IDS_NAME).read_text(encoding="utf-8"))
    tensors = load_file(str(directory / EMBEDDINGS_NAME)) if (directory / EMBEDDINGS_NAME).is_file() else {}
    return config, names, tensors


__all__ = ["CONFIG_NAME", "EMBEDDINGS_NAME", "FAISS_NAME", "FORMAT_VERSION", "IDS_NAME", "read_index_files", "write_index_files"]
