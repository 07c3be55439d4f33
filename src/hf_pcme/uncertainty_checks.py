"""Input checks and JSON helpers shared by the uncertainty analysis modules (:mod:`hf_pcme.uncertainty`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


# ---------------------------------------------------------------------------- input checks
def _vector(value: Any, name: str, *, allow_nan: bool = False) -> np.ndarray:
    """A finite 1-D float64 array (NaN allowed only where documented: a query that is not scored)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().double().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a 1-D array of numbers, got {type(value).__name__}.") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per query), got shape {array.shape}.")
    if array.size == 0:
        raise ValueError(f"{name} is empty: the analysis needs at least one query.")
    bad = np.isinf(array) if allow_nan else ~np.isfinite(array)
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} NaN or infinite value(s) (e.g. at index {int(np.flatnonzero(bad)[0])}); "
            "check the embeddings (a NaN log_sigma2 means a diverged model) or drop those queries."
        )
    return array


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"the inputs must have one value per query each, got lengths {lengths}.")


def _check_num_bins(num_bins: int, name: str = "num_bins") -> int:
    if isinstance(num_bins, bool) or int(num_bins) != num_bins or num_bins < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {num_bins!r}.")
    return int(num_bins)


def _flat(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().double().cpu().numpy()
    try:
        array = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an array of numbers, got {type(value).__name__}.") from None
    if array.size == 0:
        raise ValueError(f"{name} is empty.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has {int((~np.isfinite(array)).sum())} NaN or infinite value(s).")
    return array



# ---------------------------------------------------------------------------- JSON helpers
def _json_float(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _json_list(values: np.ndarray) -> list[float | None]:
    return [_json_float(float(v)) for v in np.asarray(values, dtype=np.float64)]

