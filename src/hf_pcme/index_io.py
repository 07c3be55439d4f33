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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .index_build import read_faiss_backend
from .index_options import AnnOptions
from .index_payload import check_ids
from .registry import check_choice
from .scoring import SCORES

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


def save_index(index: Any, directory: Path) -> Path:
    """Write a :class:`~hf_pcme.index.CrossModalIndex` to ``directory`` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    if index.backend == "faiss":
        index._searcher.write(directory / FAISS_NAME)
    # FAISS flat, IVF-Flat and HNSW store the exact vectors; the torch tensor and IVF-PQ's codes do not.
    keep_mean = index.backend == "torch" or getattr(index._searcher, "exact", None) is not None
    config = {
        "num_items": index.num_items, "embed_dim": index.embed_dim, "num_embeds": index.num_embeds,
        "modality": index.modality, "metric": index.metric, "backend": index.backend,
        "faiss_index_type": index.faiss_index_type, "nlist": index.nlist, "nprobe": index.nprobe,
        "model_fingerprint": index.model_fingerprint,
    }  # fmt: skip
    if index.faiss_index_type != "flat":
        config["ann"] = index.ann_options.to_dict()
    tensors = {"mean": index.mean if keep_mean else None, "log_sigma2": index.log_sigma2, "attention": index.attention}
    write_index_files(directory, config, index.ids, index.texts, tensors)
    return directory


def load_index(
    cls: type, directory: Path, *, backend: str | None, device: Any, nprobe: int | None, ef_search: int | None
) -> Any:
    """Read a :class:`~hf_pcme.index.CrossModalIndex` (``cls``) saved by :func:`save_index`, into ``backend``."""
    config, names, tensors = read_index_files(directory)
    backend = backend or config["backend"]
    check_choice(backend, ("torch", "faiss"), "backend")
    log_sigma2 = tensors.get("log_sigma2")
    log_sigma2 = log_sigma2.float() if log_sigma2 is not None else None
    ann_options = AnnOptions.from_dict(config.get("ann"))
    if ef_search is not None:
        ann_options = replace(ann_options, ef_search=ef_search)
    common = dict(
        ids=names["ids"], texts=names["texts"], attention=tensors.get("attention"), modality=config["modality"],
        metric=config["metric"], model_fingerprint=config["model_fingerprint"],
        nprobe=nprobe if nprobe is not None else config["nprobe"],
    )  # fmt: skip
    mean = tensors.get("mean")
    if config["backend"] == "faiss":
        config = {**config, "ann": ann_options.to_dict()}
        searcher = read_faiss_backend(directory / FAISS_NAME, config, mean, log_sigma2)
        if backend == "faiss":
            common["ids"] = check_ids(common["ids"], config["num_items"])
            return cls(searcher=searcher, embed_dim=config["embed_dim"], log_sigma2=log_sigma2,
                       faiss_index_type=config["faiss_index_type"], nlist=config["nlist"], **common)  # fmt: skip
        mean = SCORES[config["metric"]]().means_from_item_vectors(searcher.reconstruct_all())
        mean = mean.squeeze(1) if config["num_embeds"] == 1 else mean
    return cls.from_embeddings(
        mean, log_sigma2, backend=backend, faiss_index_type=config["faiss_index_type"], nlist=config["nlist"],
        ann_options=ann_options, device=device, **common,
    )  # fmt: skip


__all__ = [
    "CONFIG_NAME",
    "EMBEDDINGS_NAME",
    "FAISS_NAME",
    "FORMAT_VERSION",
    "IDS_NAME",
    "load_index",
    "read_index_files",
    "save_index",
    "write_index_files",
]
