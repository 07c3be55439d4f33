"""What the demo computes, without any UI: load a PCME model, index a gallery, answer queries.

The Gradio app (``app.py``) only renders what :class:`DemoBackend` returns, so everything here can
be driven (and tested) without a browser::

    backend = DemoBackend("runs/main_job/pcme", gallery="shapes")   # builds the indexes once
    answer = backend.query_text("a red circle", top_k=8)             # images, best first
    answer = backend.query_image("query.png")                        # captions (or similar images)
    backend.set_gallery(backend.load_gallery("path/to/images"))      # hot swap, model stays loaded

A gallery is a set of images (and optionally captions: the shapes test captions, or a
``captions.txt`` next to the images, one per line). Text queries rank the gallery's images;
image queries rank its captions, or its images when it has no captions.

Indexes are immutable and a gallery is swapped by one reference assignment, so a query running
during a swap sees entirely the old gallery or entirely the new one (as ``pipeline.set_index``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

import hf_pcme  # noqa: F401  (registers "pcme" with Auto* and the pipeline)
from hf_pcme.index import CrossModalIndex
from hf_pcme.pipeline_cross_modal_retrieval import TASK

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CAPTIONS_FILE = "captions.txt"
THUMBNAIL_SIZE = 160
#: Files the analysis may leave next to a model: plots shown in the "Model analysis" tab, first
#: the uncertainty-vs-vagueness plot, then calibration / reliability, then any other PNG.
PLOT_ORDER = ("uncertainty_vs_vagueness", "vagueness", "calibration", "reliability")
ANALYSIS_FILES = ("uncertainty_report.json", "uncertainty_analysis.json", "uncertainty.json")


class DemoInputError(ValueError):
    """A query or upload the demo cannot use; the message tells the user what to do instead."""


# ---------------------------------------------------------------------------- data classes
@dataclass(frozen=True)
class Gallery:
    """The searchable items: images (always) and captions (when known), each with its index."""

    name: str
    images: list[Image.Image]  # display thumbnails, in index order
    image_index: CrossModalIndex
    captions: list[str] | None = None
    caption_index: CrossModalIndex | None = None
    # sorted item uncertainties, for "higher than p % of the gallery" (None: point embeddings)
    image_uncertainty_sorted: np.ndarray | None = None
    caption_uncertainty_sorted: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def describe(self) -> str:
        captions = f" and {len(self.captions)} captions" if self.captions else ""
        return f"{self.name}: {len(self.images)} images{captions}"


@dataclass
class ResultItem:
    rank: int
    id: Any
    score: float
    match_probability: float
    uncertainty: float | None
    uncertainty_percentile: float | None  # share of the searched items with a lower sigma^2, in %
    text: str | None = None
    image: Image.Image | None = None


@dataclass
class QueryAnswer:
    """One query's results (best first) and what the model says about the query itself."""

    query_modality: str  # "text" or "image"
    result_modality: str  # what the results are: "image" or "text"
    results: list[ResultItem]
    query_uncertainty: float | None
    query_uncertainty_percentile: float | None
    explanation: str
    word_attention: list[tuple[str, float]] | None = None  # caption queries: (token, weight)
    attention_heatmap: Image.Image | None = None  # image queries: the pooling attention over the image
    seconds: float = 0.0
    gallery_name: str = ""


@dataclass
class UncertaintyAnalysis:
    """What was measured about this model's caption uncertainty (from files next to the model)."""

    spearman_rho: float | None = None  # caption sigma^2 vs vagueness (plausible images per caption)
    levels: list[dict] = field(default_factory=list)  # per specificity level: mean_sigma2, description
    source: str | None = None


# ---------------------------------------------------------------------------- model folder
def check_model_dir(model: str | os.PathLike) -> Path:
    """The local folder of a saved PCME model; a clear ``ValueError`` for anything else.

    A string that is not an existing path is tried as a Hub repository id (``owner/name``).
    """
    path = Path(model)
    if not path.exists() and isinstance(model, str) and model.count("/") == 1 and not model.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(model))
        except Exception as error:  # offline, unknown repo, ...: say what was tried
            raise ValueError(
                f"--model {model!r} is neither a local folder nor a downloadable Hub model ({error})."
            ) from error
    if not path.is_dir():
        raise ValueError(
            f"--model {str(model)!r} is not a folder. Give the folder a PCME model was saved to, e.g. "
            "runs/main_job/pcme (made by `python scripts/main_job.py`)."
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"{path} is not a PCME model folder: it has no config.json. Give the folder written by "
            "model.save_pretrained(...) (e.g. runs/main_job/pcme)."
        )
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}): is this a saved model folder?") from error
    if model_type != "pcme":
        raise ValueError(
            f"{path} holds a {model_type!r} model, not a PCME model (config.json model_type must be 'pcme'). "
            "This demo needs a model saved by hf_pcme (PCMEModel.save_pretrained)."
        )
    return path


def analysis_plots(model_dir: str | os.PathLike) -> list[Path]:
    """PNG plots saved next to the model, uncertainty-vs-vagueness first, then calibration."""

    def order(path: Path) -> tuple[int, str]:
        name = path.stem.lower()
        for position, key in enumerate(PLOT_ORDER):
            if key in name:
                return position, name
        return len(PLOT_ORDER), name

    return sorted(Path(model_dir).glob("*.png"), key=order)


def load_uncertainty_analysis(model_dir: str | os.PathLike) -> UncertaintyAnalysis | None:
    """The measured caption-uncertainty analysis of a model, if one was saved with it.

    Looks for a JSON report in the model folder (``uncertainty_report.json`` and similar, with a
    ``spearman_rho``), then for the main job's ``results.json`` one level up
    (``uncertainty_vs_vagueness[<model folder name>]``). Returns ``None`` when there is none.
    """
    model_dir = Path(model_dir)
    candidates: list[tuple[Path, list[str]]] = [(model_dir / name, []) for name in ANALYSIS_FILES]
    candidates.append((model_dir.parent / "results.json", ["uncertainty_vs_vagueness", model_dir.name]))
    for path, keys in candidates:
        if not path.is_file():
            continue
        try:
            report: Any = json.loads(path.read_text(encoding="utf-8"))
            for key in keys:
                report = report[key]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        rho = _find_number(report, ("spearman_rho", "spearman", "rho"))
        if rho is None:
            continue
        levels = report.get("levels", []) if isinstance(report, dict) else []
        levels = [level for level in levels if isinstance(level, dict) and "mean_sigma2" in level]
        return UncertaintyAnalysis(spearman_rho=rho, levels=levels, source=str(path))
    return None


def _find_number(report: Any, keys: Sequence[str]) -> float | None:
    if not isinstance(report, dict):
        return None
    for key in keys:
        value = report.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, dict):  # e.g. {"spearman": {"rho": ..., "p": ...}}
            nested = _find_number(value, ("rho", "value", "statistic"))
            if nested is not None:
                return nested
    return None


def explain_uncertainty(
    value: float | None, modality: str, percentile: float | None, analysis: UncertaintyAnalysis | None
) -> str:
    """One sentence on what this query's sigma^2 means for this model (measured, not promised)."""
    if value is None:
        return "This model has point embeddings (no variance), so it gives no uncertainty for the query."
    where = "" if percentile is None else f", higher than {percentile:.0f}% of the gallery's {'captions' if modality == 'text' else 'images'}"
    head = f"σ² = {value:.4g}{where}. "
    if analysis is None or analysis.spearman_rho is None:
        return head + (
            "No uncertainty analysis was saved with this model, so read σ² only relative to the gallery: a higher "
            "value means the model spread this query's embedding wider; whether that tracks ambiguity was not measured."
        )
    rho = analysis.spearman_rho
    if modality != "text":
        return head + (
            f"The model's saved analysis covers captions only (Spearman ρ = {rho:+.2f} against vagueness); "
            "for images σ² is only a relative value, not a measured sign of ambiguity."
        )
    closest = ""
    if analysis.levels:
        level = min(analysis.levels, key=lambda row: abs(float(row["mean_sigma2"]) - value))
        label = level.get("description") or f"level {level.get('level', '?')}"
        closest = f"; this value is closest to the mean of its '{label}' captions"
    if rho <= -0.3:
        meaning = "lower σ² went with vaguer captions (ones that fit many images) and higher σ² with specific ones"
    elif rho >= 0.3:
        meaning = "higher σ² went with vaguer captions (ones that fit many images) and lower σ² with specific ones"
    else:
        meaning = "σ² was only weakly related to how many images a caption fits"
    return head + (
        f"On its test captions this model's {meaning} (Spearman ρ = {rho:+.2f}){closest}: "
        "that is how it behaved when measured, not a promise about this query."
    )


# ---------------------------------------------------------------------------- inputs
def load_query_image(image: Any) -> Image.Image:
    """An RGB PIL image from a PIL image or an uploaded file path; :class:`DemoInputError` otherwise."""
    if image is None:
        raise DemoInputError("No image: upload an image file (PNG, JPEG, ...) first.")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = _as_path(image)
    if not path.is_file():
        raise DemoInputError(f"'{path}' does not exist (or is not a file): upload the image again.")
    try:
        with Image.open(path) as opened:
            opened.load()
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DemoInputError(
            f"'{path.name}' is not an image this demo can read ({type(error).__name__}): upload a PNG, JPEG, "
            "GIF, BMP or WebP file."
        ) from error


def _as_path(item: Any) -> Path:
    """A path from a str / PathLike, or from an uploaded-file object's ``name``."""
    return Path(item) if isinstance(item, (str, os.PathLike)) else Path(item.name)


def _thumbnail(image: Image.Image) -> Image.Image:
    thumb = image.convert("RGB")
    thumb.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    return thumb


def _sorted_uncertainty(index: CrossModalIndex | None) -> np.ndarray | None:
    if index is None or index.uncertainty is None:
        return None
    return np.sort(index.uncertainty.numpy())


def _percentile(sorted_values: np.ndarray | None, value: float | None) -> float | None:
    if sorted_values is None or value is None or len(sorted_values) == 0:
        return None
    return 100.0 * float(np.searchsorted(sorted_values, value, side="left")) / len(sorted_values)


# ---------------------------------------------------------------------------- the backend
class DemoBackend:
    """A loaded PCME model, its retrieval pipeline and the current gallery.

    Args:
        model: a PCME model folder (or ``(model, processor)`` already loaded, for tests).
        gallery: ``"shapes"`` (the shapes test split: 500 images and their captions), a folder of
            images (with an optional ``captions.txt``), a list of image paths / PIL images, or a
            :class:`Gallery`. Built once here, with a progress bar.
        gallery_captions: captions for a gallery given as a list of images.
        batch_size: items embedded per forward pass while indexing.
        progress_bar: show tqdm bars while indexing.
        device: where the model runs (default: a loaded model's own device; for a folder, CUDA
            when available, else the CPU).
        analysis, plots: override what is read from the model folder (tests, other layouts).
    """

    def __init__(
        self,
        model: str | os.PathLike | tuple[Any, Any],
        gallery: Any = "shapes",
        *,
        gallery_captions: Sequence[str] | None = None,
        batch_size: int = 100,
        progress_bar: bool = True,
        device: str | None = None,
        analysis: UncertaintyAnalysis | None = None,
        plots: Sequence[Path] | None = None,
    ):
        import torch
        from transformers import AutoModel, AutoProcessor, pipeline

        started = time.perf_counter()
        if isinstance(model, tuple):
            self.model_dir: Path | None = None
            self.model, self.processor = model
            self.model_name = type(self.model).__name__
            device = device or str(next(self.model.parameters()).device)
        else:
            self.model_dir = check_model_dir(model)
            self.model = AutoModel.from_pretrained(self.model_dir)
            self.processor = AutoProcessor.from_pretrained(self.model_dir)
            self.model_name = self.model_dir.name
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(device).eval()
        self.batch_size = batch_size
        self.progress_bar = progress_bar
        self.analysis = analysis if analysis is not None else (
            load_uncertainty_analysis(self.model_dir) if self.model_dir else None
        )
        self.plots = list(plots) if plots is not None else (analysis_plots(self.model_dir) if self.model_dir else [])
        self.retriever = pipeline(TASK, model=self.model, processor=self.processor, device=device, progress_bar=False)
        self._gallery: Gallery | None = None
        self.set_gallery(gallery if isinstance(gallery, Gallery) else self.load_gallery(gallery, captions=gallery_captions))
        self.startup_seconds = time.perf_counter() - started

    # ------------------------------------------------------------------ galleries
    @property
    def gallery(self) -> Gallery:
        """The gallery searched by queries that name none."""
        assert self._gallery is not None
        return self._gallery

    def set_gallery(self, gallery: Gallery) -> None:
        """Swap the default gallery (one reference assignment: a running query keeps the old one)."""
        if not isinstance(gallery, Gallery):
            raise TypeError(f"gallery must be a Gallery (see load_gallery), got {type(gallery).__name__}.")
        self.retriever.set_index(gallery.image_index)  # checks the index belongs to this model
        self._gallery = gallery

    def load_gallery(self, source: Any, *, name: str | None = None, captions: Sequence[str] | None = None) -> Gallery:
        """Embed and index a gallery: ``"shapes"``, a folder, or a list of image files / PIL images."""
        if isinstance(source, str) and source == "shapes":
            images, shapes_captions = _shapes_test_gallery()
            return self.index_gallery(images, captions=shapes_captions, name=name or "shapes test split")
        if isinstance(source, (str, os.PathLike)):
            folder = Path(source)
            if not folder.is_dir():
                raise ValueError(
                    f"gallery {str(source)!r} is neither 'shapes' nor a folder: give a folder of images "
                    "(PNG, JPEG, ...; optionally a captions.txt with one caption per line)."
                )
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"gallery folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
            captions_file = folder / CAPTIONS_FILE
            if captions is None and captions_file.is_file():
                captions = [line.strip() for line in captions_file.read_text(encoding="utf-8").splitlines()]
            return self.index_gallery(_read_images(files), captions=captions, name=name or folder.name)
        items = list(source)
        if not items:
            raise DemoInputError("No images given for the gallery: upload at least one image.")
        images = [item if isinstance(item, Image.Image) else None for item in items]
        paths = [_as_path(item) for item, image in zip(items, images) if image is None]
        loaded = iter(_read_images(paths)) if paths else iter(())
        images = [image if image is not None else next(loaded) for image in images]
        return self.index_gallery(images, captions=captions, name=name or f"{len(images)} uploaded images")

    def index_gallery(self, images: Sequence[Image.Image], *, captions: Sequence[str] | None = None,
                      name: str = "gallery") -> Gallery:
        """Embed ``images`` (and ``captions``) with the model and index them."""
        images = [image.convert("RGB") for image in images]
        if not images:
            raise DemoInputError("The gallery is empty: give at least one image.")
        image_index = self.retriever.build_index(
            images, modality="image", batch_size=self.batch_size, progress_bar=self.progress_bar, store_attention=False
        )
        caption_index = None
        if captions:
            captions = list(dict.fromkeys(c.strip() for c in captions if c and c.strip()))  # unique, in order
            caption_index = self.retriever.build_index(
                captions, modality="text", batch_size=self.batch_size, progress_bar=self.progress_bar
            )
        return Gallery(
            name=name,
            images=[_thumbnail(image) for image in images],
            image_index=image_index,
            captions=list(captions) if caption_index is not None else None,
            caption_index=caption_index,
            image_uncertainty_sorted=_sorted_uncertainty(image_index),
            caption_uncertainty_sorted=_sorted_uncertainty(caption_index),
        )

    # ------------------------------------------------------------------ queries
    def query_text(self, caption: Any, top_k: int = 8, gallery: Gallery | None = None) -> QueryAnswer:
        """Rank the gallery's images for a caption."""
        started = time.perf_counter()
        if not isinstance(caption, str) or not caption.strip():
            raise DemoInputError("The caption is empty: type what you are looking for, e.g. 'a red circle'.")
        caption = caption.strip()
        gallery = gallery or self.gallery
        tokens, keep = self._caption_tokens(caption)
        output = self.retriever(
            texts=caption, corpus=gallery.image_index, top_k=_top_k(top_k, len(gallery)), return_attention=True
        )
        word_attention = None
        if output.get("attention") is not None:  # (K, L) over the tokens: mean of the K maps
            weights = output["attention"].mean(axis=0).tolist()
            word_attention = [(token, weights[i]) for i, token in zip(keep, tokens)]
        percentile = _percentile(gallery.caption_uncertainty_sorted, output["query_uncertainty"])
        return QueryAnswer(
            query_modality="text",
            result_modality="image",
            results=self._items(output["results"], gallery, "image"),
            query_uncertainty=output["query_uncertainty"],
            query_uncertainty_percentile=percentile,
            explanation=explain_uncertainty(output["query_uncertainty"], "text", percentile, self.analysis),
            word_attention=word_attention,
            seconds=time.perf_counter() - started,
            gallery_name=gallery.name,
        )

    def query_image(self, image: Any, top_k: int = 8, gallery: Gallery | None = None) -> QueryAnswer:
        """Rank the gallery's captions (or, without captions, its images) for an image."""
        started = time.perf_counter()
        image = load_query_image(image)
        gallery = gallery or self.gallery
        to_captions = gallery.caption_index is not None
        index = gallery.caption_index if to_captions else gallery.image_index
        size = len(gallery.captions) if to_captions else len(gallery)
        output = self.retriever(images=image, corpus=index, top_k=_top_k(top_k, size), return_attention=True)
        percentile = _percentile(gallery.image_uncertainty_sorted, output["query_uncertainty"])
        return QueryAnswer(
            query_modality="image",
            result_modality="text" if to_captions else "image",
            results=self._items(output["results"], gallery, "text" if to_captions else "image"),
            query_uncertainty=output["query_uncertainty"],
            query_uncertainty_percentile=percentile,
            explanation=explain_uncertainty(output["query_uncertainty"], "image", percentile, self.analysis),
            attention_heatmap=output.get("attention_heatmap"),
            seconds=time.perf_counter() - started,
            gallery_name=gallery.name,
        )

    def _items(self, results: list[dict], gallery: Gallery, modality: str) -> list[ResultItem]:
        reference = gallery.image_uncertainty_sorted if modality == "image" else gallery.caption_uncertainty_sorted
        items = []
        for rank, result in enumerate(results, start=1):
            items.append(
                ResultItem(
                    rank=rank,
                    id=result["id"],
                    score=result["score"],
                    match_probability=result["match_probability"],
                    uncertainty=result["uncertainty"],
                    uncertainty_percentile=_percentile(reference, result["uncertainty"]),
                    text=result.get("text"),
                    image=gallery.images[result["id"]] if modality == "image" else None,
                )
            )
        return items

    def _caption_tokens(self, caption: str) -> tuple[list[str], list[int]]:
        """The caption's tokens as the model reads them, and their positions (special tokens left out).

        Raises :class:`DemoInputError` when no word of the caption is in the model's vocabulary.
        """
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        ids = tokenizer(caption, truncation=True)["input_ids"]
        unknown = tokenizer.unk_token_id
        special = set(tokenizer.all_special_ids) - {unknown}
        keep = [position for position, token_id in enumerate(ids) if token_id not in special]
        if unknown is not None and keep and all(ids[position] == unknown for position in keep):
            raise DemoInputError(
                f"None of the words of {caption!r} is in this model's vocabulary, so it cannot be searched: "
                "use words from its training captions (e.g. shapes, colours, sizes, positions)."
            )
        tokens = tokenizer.convert_ids_to_tokens(ids)
        return [tokens[position] for position in keep], keep


def _top_k(top_k: Any, size: int) -> int:
    try:
        top_k = int(top_k)
    except (TypeError, ValueError) as error:
        raise DemoInputError(f"The number of results must be a whole number, got {top_k!r}.") from error
    if top_k < 1:
        raise DemoInputError(f"The number of results must be at least 1, got {top_k}.")
    return min(top_k, size)


def _read_images(paths: Sequence[Path]) -> list[Image.Image]:
    images, bad = [], []
    for path in paths:
        try:
            images.append(load_query_image(path))
        except DemoInputError:
            bad.append(path.name)
    if bad:
        raise DemoInputError(f"Not images (cannot be read): {', '.join(bad)}. Give only image files for a gallery.")
    return images


def _shapes_test_gallery() -> tuple[list[Image.Image], list[str]]:
    """The 500 images and the captions of the shapes test split (the main job's evaluation data)."""
    from hf_pcme.data import load_shapes, make_retrieval_split

    view = make_retrieval_split(load_shapes(split="test"))
    return list(view.images[:]["image"]), list(view.captions[:]["caption"])


__all__ = [
    "DemoBackend",
    "DemoInputError",
    "Gallery",
    "QueryAnswer",
    "ResultItem",
    "UncertaintyAnalysis",
    "analysis_plots",
    "check_model_dir",
    "explain_uncertainty",
    "load_query_image",
    "load_uncertainty_analysis",
]
