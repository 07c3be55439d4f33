"""The ``"cross-modal-retrieval"`` pipeline: captions for images, images for captions.

```python
import hf_pcme  # registers the task
from transformers import pipeline

retriever = pipeline("cross-modal-retrieval", model="path-or-hub-id")
retriever(images=[img], corpus=captions, top_k=5)
retriever(texts=["a dog on a sofa"], corpus=index, top_k=5)     # a prebuilt CrossModalIndex
retriever.set_index(other_index)                                 # hot swap, model stays loaded
```

Each query returns its ranked items (id, text for captions, ``score`` of the index metric,
``distance`` for CSD, ``match_probability`` from the model, the item's ``uncertainty``) and its own
``query_uncertainty`` (mean over D of sigma^2; ``None`` for point embeddings). With
``return_attention=True`` queries (and image items) also carry the attention maps of the pooling
head (for captions: over the tokens, padding weighted 0), and image queries a heatmap of it drawn
over the image.

This file is shipped as remote code with pushed models: it only imports flat sibling modules. It holds
the transformers pipeline contract (``_sanitize_parameters`` / ``preprocess`` / ``_forward`` /
``postprocess``); query normalisation is in :mod:`hf_pcme.pipeline_inputs`, the two-stage re-ranking glue
in :mod:`hf_pcme.pipeline_rerank`, the match probabilities and result dicts in :mod:`hf_pcme.pipeline_results`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel
from transformers.pipelines.base import ChunkPipeline

from .encoding import infer_modality, load_images
from .index import CrossModalIndex, model_fingerprint
from .pipeline_inputs import query_aliases, query_list
from .pipeline_rerank import load_reranker, rerank_outputs, reranker_features
from .pipeline_results import format_results, match_probabilities
from .rerank import check_rerank_top_k
from .scoring import default_search_score

TASK = "cross-modal-retrieval"

#: What a pushed ``config.json`` declares so that ``pipeline(..., trust_remote_code=True)`` finds
#: this class without ``hf_pcme`` installed (``custom_pipelines`` is read by ``transformers.pipeline``).
CUSTOM_PIPELINES = {
    TASK: {
        "impl": "pipeline_cross_modal_retrieval.CrossModalRetrievalPipeline",
        "pt": ["AutoModel"],
        "tf": [],
        "type": "multimodal",
    }
}

#: Call keywords by the pipeline step that uses them (transformers' ``_sanitize_parameters`` contract).
_PREPROCESS_PARAMETERS = ("corpus", "query_batch_size", "metric", "backend", "corpus_modality", "progress_bar")
_FORWARD_PARAMETERS = ("top_k", "return_attention", "match_seed", "rerank_top_k")
_POSTPROCESS_PARAMETERS = ("return_attention",)
_CALL_PARAMETERS = ("top_k", "return_attention", "metric", "backend", "corpus_modality", "progress_bar",
                    "match_seed", "rerank_top_k")


class CrossModalRetrievalPipeline(ChunkPipeline):
    """Rank a corpus of captions (or images) for image (or caption) queries with a PCME model.

    Call with ``images=`` or ``texts=`` (one modality per call) and a ``corpus``: a list of
    captions, a list of images (PIL or ``pathlib.Path``; local paths given as str need
    ``corpus_modality="image"``), or a prebuilt :class:`CrossModalIndex`. Without ``corpus``
    the index given at construction (``pipeline(..., index=...)``) or by :meth:`set_index` is used.

    Keyword arguments (at construction or per call): ``top_k`` (5), ``batch_size`` (queries and
    corpus items per forward pass), ``return_attention`` (False), ``metric`` / ``backend`` for an
    index built from a corpus list (default: the model's :func:`hf_pcme.scoring.default_search_score`, ``"torch"``),
    ``corpus_modality`` (``"auto"``), ``progress_bar`` (True, while a corpus list is embedded),
    ``match_seed`` (default: the model's ``config.inference_seed``, so the Monte-Carlo samples of the
    match probability are reproducible; ``None`` there = fresh noise).

    Two-stage retrieval: ``pipeline(..., reranker=IMRAMModel or folder, rerank_top_k=50)`` takes each
    query's first-stage top ``rerank_top_k`` (>= ``top_k``; default 50) from the index, re-orders them by the
    re-ranker's score (fused with the first-stage score when its ``config.fusion_weight`` < 1) and returns the first ``top_k``; each item keeps its first-stage ``score``,
    ``match_probability`` and ``uncertainty`` and gains ``rerank_score`` and ``first_stage_rank``.
    The re-ranker must read the same inputs as the model (its towers' configs equal, e.g. built with
    ``IMRAMModel.from_dual_encoder``), and the index must come from a corpus list or :meth:`build_index`.
    """

    _load_processor = None
    _load_tokenizer = None
    _load_image_processor = None
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, *args: Any, index: CrossModalIndex | None = None, reranker: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # The embeddings of a model's index are only comparable with that model's queries.
        self._model_fingerprint = model_fingerprint(self.model)
        self._index: CrossModalIndex | None = None
        self.reranker = load_reranker(reranker, self.model, self.device)
        # The re-ranker's local features of each index's items, for indexes this pipeline built.
        self._rerank_features: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        if index is not None:
            self.set_index(index)

    # ------------------------------------------------------------------ index
    @property
    def index(self) -> CrossModalIndex | None:
        """The index searched when a call gives no ``corpus``."""
        return self._index

    def set_index(self, index: CrossModalIndex | None) -> None:
        """Replace the default index without reloading the model.

        Safe against concurrent queries: indexes are immutable and a call reads this attribute
        once, so a query runs entirely on the old index or entirely on the new one. Raises a
        ``ValueError`` for an index built by another model or for another embedding size.
        """
        if index is not None:
            self._check_index(index)
        self._index = index  # one reference assignment: atomic

    def _check_index(self, index: Any) -> None:
        if not isinstance(index, CrossModalIndex):
            raise TypeError(f"index must be a CrossModalIndex, got {type(index).__name__}.")
        index.check_compatible(self._model_fingerprint, getattr(self.model.config, "embed_dim", None))

    def build_index(self, corpus: Sequence[Any], **kwargs: Any) -> CrossModalIndex:
        """Embed a corpus with this pipeline's model (see :meth:`CrossModalIndex.build`)."""
        corpus = list(corpus)
        if not corpus:
            raise ValueError("corpus is empty: give at least one caption or image to search.")
        modality = kwargs.pop("modality", None)
        modality = infer_modality(corpus, "corpus") if modality in (None, "auto") else modality
        kwargs.setdefault("batch_size", self._batch_size or 32)
        kwargs.setdefault("device", self.device)
        kwargs.setdefault("metric", default_search_score(self.model.config))
        index = CrossModalIndex.build(self.model, self._processor_for(modality), corpus, modality, **kwargs)
        if self.reranker is not None:
            self._rerank_features[index] = self._local_features(corpus, modality, kwargs["batch_size"])
        return index

    @torch.no_grad()
    def _local_features(self, items: Sequence[Any], modality: str, batch_size: int) -> Any:
        """The re-ranker's local features of corpus items (captions or images), concatenated."""
        from .modeling_imram import concat_local_features

        parts = []
        for start in range(0, len(items), batch_size):
            inputs = self._preprocess_queries(items[start : start + batch_size], modality)
            parts.append(reranker_features(self.reranker, inputs, self.device))
        return concat_local_features(parts)

    def _processor_for(self, modality: str) -> Any:
        if self.processor is not None:
            return self.processor
        part = self.tokenizer if modality == "text" else self.image_processor
        if part is None:
            what = "a tokenizer" if modality == "text" else "an image processor"
            files = "tokenizer.json / tokenizer_config.json" if modality == "text" else "preprocessor_config.json"
            folder = getattr(self.model, "name_or_path", "")
            where = f" The model folder {folder} has no {files}." if folder and Path(folder).is_dir() else ""
            raise ValueError(
                f"This pipeline has no processor and no {what}, so it cannot read {modality} inputs.{where} Save the "
                "processor next to the model (processor.save_pretrained(folder)), or pass "
                "processor=PCMEProcessor(...) (or tokenizer= / image_processor=) to pipeline()."
            )
        return part

    # ------------------------------------------------------------------ call
    def __call__(
        self, images: Any = None, texts: Any = None, *, batch_size: int | None = None, **kwargs: Any
    ) -> dict | list[dict]:
        """Retrieve the ``top_k`` corpus items of each query.

        Args:
            images: one image or a list (PIL images or local paths).
            texts: one caption or a list of captions.
            corpus: captions, images, or a :class:`CrossModalIndex` (default: :attr:`index`).
            batch_size: queries (and corpus items) per forward pass.
        Returns:
            For one query a dict, for a list a list of dicts ``{"query_uncertainty", "results"
            [, "attention", "attention_heatmap"]}``; ``results`` is best first, each
            ``{"id", ["text",] "score", ["distance",] "match_probability", "uncertainty" [, "attention"]}``.

        Only names the queries (``images=`` / ``texts=``, as transformers' own multimodal pipelines
        do) and hands over to ``Pipeline.__call__``: :meth:`_sanitize_parameters`, then
        :meth:`preprocess` (one chunk per ``batch_size`` queries), :meth:`_forward` per chunk and
        :meth:`postprocess` of all chunks.
        """
        images, texts = query_aliases(images, texts, kwargs)
        self._sanitize_parameters(**kwargs)  # unknown keywords first
        queries, modality, single = query_list(images, texts)
        query_batch_size = batch_size or self._batch_size or 8
        if query_batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {query_batch_size}.")
        # batch_size=1 for transformers' loader: each chunk of preprocess is already a batch of queries.
        outputs = super().__call__(
            {"queries": queries, "modality": modality}, batch_size=1, query_batch_size=query_batch_size, **kwargs
        )
        return outputs[0] if single else outputs

    def _resolve_index(self, corpus: Any, batch_size: int, build_options: dict) -> CrossModalIndex:
        build_options = {
            "metric": build_options.get("metric") or default_search_score(self.model.config),
            "backend": build_options.get("backend", "torch"),
            "modality": build_options.get("corpus_modality", "auto"),
            "progress_bar": build_options.get("progress_bar", True),
        }
        if corpus is None:
            index = self._index  # read once: the whole call uses this index even if set_index runs now
            if index is None:
                raise ValueError(
                    "No corpus to search: pass corpus=[captions or images] or corpus=CrossModalIndex, "
                    "or set a default index with retriever.set_index(index)."
                )
            return index
        if isinstance(corpus, CrossModalIndex):
            self._check_index(corpus)
            return corpus
        if isinstance(corpus, (str, Path)) or not isinstance(corpus, Sequence):
            raise ValueError(
                "corpus must be a list of captions or images, or a CrossModalIndex; "
                f"got {type(corpus).__name__} (wrap a single item in a list)."
            )
        return self.build_index(corpus, batch_size=batch_size, **build_options)

    def _sanitize_parameters(self, **kwargs: Any) -> tuple[dict, dict, dict]:
        unknown = sorted(set(kwargs) - set(_CALL_PARAMETERS) - {"corpus", "query_batch_size"})
        if unknown:
            raise ValueError(
                f"Unknown argument(s) {', '.join(unknown)} for the {TASK} pipeline; valid ones are: "
                f"{', '.join(_CALL_PARAMETERS)}, batch_size, corpus, images, texts."
            )

        def pick(names: tuple[str, ...]) -> dict[str, Any]:
            return {key: kwargs[key] for key in names if key in kwargs}

        return pick(_PREPROCESS_PARAMETERS), pick(_FORWARD_PARAMETERS), pick(_POSTPROCESS_PARAMETERS)

    # ------------------------------------------------------------------ steps
    def preprocess(
        self, inputs: dict[str, Any], corpus: Any = None, query_batch_size: int = 8, **build_options: Any
    ) -> Any:
        """Resolve the index once (building it from a corpus list), then yield one chunk per
        ``query_batch_size`` queries: tokenised captions or processed images (PIL kept for the heatmaps)."""
        queries, modality = inputs["queries"], inputs["modality"]
        index = self._resolve_index(corpus, query_batch_size, build_options)
        for start in range(0, len(queries), query_batch_size):
            chunk = self._preprocess_queries(queries[start : start + query_batch_size], modality)
            yield {**chunk, "index": index, "is_last": start + query_batch_size >= len(queries)}

    def _preprocess_queries(self, queries: Sequence[Any], modality: str) -> dict[str, Any]:
        processor = self._processor_for(modality)
        if modality == "text":
            inputs = processor(text=list(queries), padding=True, truncation=True, return_tensors="pt")
            return {
                "modality": "text",
                "input_ids": inputs["input_ids"],
                "attention_mask": inputs.get("attention_mask"),
            }
        pil_images = load_images(queries)
        inputs = processor(images=pil_images, return_tensors="pt")
        return {"modality": "image", "pixel_values": inputs["pixel_values"], "images": pil_images}

    def _forward(
        self,
        model_inputs: dict[str, Any],
        top_k: int = 5,
        return_attention: bool = False,
        match_seed: int | None = None,
        rerank_top_k: int | None = None,
    ) -> dict[str, Any]:
        modality, index = model_inputs["modality"], model_inputs["index"]
        first_stage_k = top_k
        if self.reranker is not None:
            rerank_top_k = check_rerank_top_k(rerank_top_k if rerank_top_k is not None else max(50, top_k), top_k)
            first_stage_k = min(rerank_top_k, index.num_items)
        if modality == "text":
            query = self.model.get_text_features(
                input_ids=model_inputs["input_ids"], attention_mask=model_inputs["attention_mask"], num_samples=0
            )
        else:
            pixel_values = model_inputs["pixel_values"].to(self.model.dtype)
            query = self.model.get_image_features(pixel_values=pixel_values, num_samples=0)
        result = index.search(query.mean, query.log_sigma2 if index.metric == "csd" else None, top_k=first_stage_k)
        outputs = {
            "modality": modality,
            "images": model_inputs.get("images"),
            "scores": result.scores,
            "indices": result.indices,
            "distances": result.distances,
            "match_probability": match_probabilities(self.model, query, modality, index, result.indices, match_seed),
            "query_uncertainty": query.uncertainty,
            "attention": query.attention if return_attention else None,
            "rerank_scores": None,
            "first_stage_ranks": None,
            "index": index,
            "is_last": model_inputs["is_last"],
        }
        if self.reranker is not None:
            items = self._rerank_features.get(index)
            outputs = rerank_outputs(self.reranker, outputs, model_inputs, items, top_k, self.device)
        return outputs

    def postprocess(self, all_outputs: list[dict[str, Any]], return_attention: bool = False) -> list[dict[str, Any]]:
        """One result dict per query, over the outputs of every chunk."""
        outputs = []
        for model_outputs in all_outputs:
            outputs.extend(format_results(model_outputs, model_outputs["index"], return_attention))
        return outputs


# ---------------------------------------------------------------------------- registration
def register_pipeline() -> None:
    """Register the ``"cross-modal-retrieval"`` task with transformers (called by ``import hf_pcme``)."""
    from transformers.pipelines import PIPELINE_REGISTRY

    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=CrossModalRetrievalPipeline, pt_model=AutoModel, type="multimodal"
    )


def declare_pipeline(config: Any, save_directory: str | Path | None = None) -> list[Path]:
    """Make a saved / pushed model folder carry this pipeline as remote code.

    Sets ``config.custom_pipelines`` (what ``pipeline(..., trust_remote_code=True)`` reads) and,
    given ``save_directory``, copies this file and the flat modules it imports next to the
    model's code. Returns the copied files.
    """
    config.custom_pipelines = {task: dict(info) for task, info in CUSTOM_PIPELINES.items()}
    if save_directory is None:
        return []
    from transformers.dynamic_module_utils import custom_object_save

    Path(save_directory).mkdir(parents=True, exist_ok=True)
    return list(custom_object_save(CrossModalRetrievalPipeline, save_directory) or [])


__all__ = [
    "CUSTOM_PIPELINES",
    "CrossModalRetrievalPipeline",
    "declare_pipeline",
    "register_pipeline",
]
