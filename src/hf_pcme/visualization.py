"""Attention heatmaps: where the pooling head of an image embedding looked.

The PIE / PCME heads pool the L local features of an image (a CNN's h x w grid, or a ViT's
patches) with attention weights ``A (K, L)`` (one map per attention head; they sum to 1 over L).
Drawn over the image, the map is a weakly supervised localisation of what the embedding encodes
(no box was ever used in training). Pure PIL + numpy; matplotlib is used only for colormaps other
than the built-in ``"jet"``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def attention_grid(
    attention: torch.Tensor | np.ndarray, grid_size: tuple[int, int] | None = None, head: int | None = None
) -> np.ndarray:
    """An attention map ``(L,)`` or ``(K, L)`` as a 2-D ``(h, w)`` float array.

    ``K`` maps are averaged (or ``head`` picks one). ``L`` is read as ``h * w`` (row-major, as a
    CNN grid is flattened) with ``grid_size=(h, w)``, else as a square ``sqrt(L) x sqrt(L)``
    grid; a ViT's extra leading token (``L = 1 + h*w``) is dropped.
    """
    if isinstance(attention, torch.Tensor):
        weights = attention.detach().float().cpu().numpy()
    else:
        weights = np.asarray(attention, dtype=np.float32)
    if weights.ndim == 2:
        weights = weights[head] if head is not None else weights.mean(axis=0)
    if weights.ndim != 1:
        raise ValueError(f"attention must be (L,) or (K, L), got shape {tuple(np.shape(attention))}.")
    length = weights.shape[0]
    if grid_size is not None:
        height, width = grid_size
        if height * width == length - 1:
            weights = weights[1:]
        elif height * width != length:
            raise ValueError(
                f"grid_size {grid_size} has {height * width} cells but the attention map has {length} positions."
            )
        return weights.reshape(height, width)
    for skip in (0, 1):
        side = math.isqrt(length - skip)
        if side > 0 and side * side == length - skip:
            return weights[skip:].reshape(side, side)
    raise ValueError(
        f"Cannot lay out {length} attention positions as a square grid: pass grid_size=(height, width)."
    )


def _jet(values: np.ndarray) -> np.ndarray:
    """The classic 'jet' colormap, values in [0, 1] -> RGB uint8 (piecewise linear, no matplotlib)."""
    red = np.clip(1.5 - np.abs(4.0 * values - 3.0), 0.0, 1.0)
    green = np.clip(1.5 - np.abs(4.0 * values - 2.0), 0.0, 1.0)
    blue = np.clip(1.5 - np.abs(4.0 * values - 1.0), 0.0, 1.0)
    return (np.stack([red, green, blue], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def _colorize(values: np.ndarray, colormap: str) -> np.ndarray:
    if colormap == "jet":
        return _jet(values)
    try:
        from matplotlib import colormaps
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"colormap {colormap!r} needs matplotlib (`pip install hf_pcme[plot]`); 'jet' is built in."
        ) from error
    return (colormaps[colormap](values)[..., :3] * 255.0 + 0.5).astype(np.uint8)


def attention_heatmap(
    image: Image.Image | str | os.PathLike,
    attention: torch.Tensor | np.ndarray,
    *,
    grid_size: tuple[int, int] | None = None,
    head: int | None = None,
    alpha: float = 0.5,
    colormap: str = "jet",
) -> Image.Image:
    """The attention map drawn over the image, as an RGB PIL image of the image's size.

    The ``(h, w)`` grid is min-max scaled to [0, 1], upsampled bilinearly to the image, coloured
    (``"jet"``: blue = little attention, red = most) and blended: ``(1 - alpha) image + alpha heat``.

    Args:
        image: the image the map belongs to (PIL or a local path).
        attention: ``(L,)`` or ``(K, L)`` weights, e.g. ``ProbabilisticEmbedding.attention[i]``.
        grid_size: ``(h, w)`` of the local features when they are not a square grid.
        head: which of the K maps to draw (default: their mean).
        alpha: opacity of the heatmap, in [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    image = image.convert("RGB")
    grid = attention_grid(attention, grid_size=grid_size, head=head)
    span = float(grid.max() - grid.min())
    scaled = (grid - grid.min()) / span if span > 0 else np.zeros_like(grid)
    upsampled = Image.fromarray(scaled.astype(np.float32)).resize(image.size, Image.Resampling.BILINEAR)
    heat = Image.fromarray(_colorize(np.clip(np.asarray(upsampled), 0.0, 1.0), colormap))
    return Image.blend(image, heat, alpha)


def save_attention_heatmap(
    image: Image.Image | str | os.PathLike, attention: torch.Tensor | np.ndarray, path: str | os.PathLike, **kwargs
) -> Path:
    """Render :func:`attention_heatmap` and write it as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    attention_heatmap(image, attention, **kwargs).save(path, format="PNG")
    return path


__all__ = ["attention_grid", "attention_heatmap", "save_attention_heatmap"]
