"""PMRP plausibility levels of every image pair from bit-packed labels, one compiled loop (CPU).

``level(i, j) = min(Hamming(labels_i, labels_j), max_zeta + 1)``, and ``max_zeta + 2`` where image
``j`` has no label (:mod:`hf_pcme.metrics.plausibility`). The labels are packed 64 per word, so a
Hamming distance is the popcount of a few XORed words; no ``(N, N)`` float intermediate is made
(the torch formula ``|a| + |b| - 2 a.b`` needs five passes over one, and on a shared 2-core
machine its two-thread element-wise ops wait for the busier core).
"""

from __future__ import annotations

import numpy as np
import torch

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; plausibility.py falls back to torch
    njit = None


def available() -> bool:
    """Whether the compiled loop can run (numba importable)."""
    return njit is not None


def pack_labels(labels: torch.Tensor) -> np.ndarray:
    """``(N, C)`` 0/1 labels -> ``(N, ceil(C / 64))`` uint64 words (bit ``c`` = label ``c``)."""
    bits = labels.detach().cpu().numpy() != 0
    packed = np.packbits(bits, axis=1, bitorder="little")
    words = -(-packed.shape[1] // 8)
    padded = np.zeros((packed.shape[0], words * 8), np.uint8)
    padded[:, : packed.shape[1]] = packed
    return padded.view(np.uint64)


def _levels_table(packed_words, labelled, max_zeta, out):
    """``out[i, j]`` = the level of image ``j`` for query image ``i`` (int8 ``(N, N)``).

    ``packed_words`` is ``(words, N)``: the inner loops run over contiguous images, so they vectorise.
    """
    num_words, num_images = packed_words.shape
    # SWAR popcount constants, as uint64 (mixing uint64 with int64 would make numba use float64)
    m1, m2, m4 = np.uint64(0x5555555555555555), np.uint64(0x3333333333333333), np.uint64(0x0F0F0F0F0F0F0F0F)
    h01 = np.uint64(0x0101010101010101)
    one, two, four, top = np.uint64(1), np.uint64(2), np.uint64(4), np.uint64(56)
    cap, unlabelled = max_zeta + 1, max_zeta + 2
    distance = np.empty(num_images, np.uint64)
    for i in range(num_images):
        distance[:] = 0
        for w in range(num_words):
            query = packed_words[w, i]
            words = packed_words[w]
            for j in range(num_images):
                x = query ^ words[j]
                x = x - ((x >> one) & m1)
                x = (x & m2) + ((x >> two) & m2)
                x = (x + (x >> four)) & m4
                distance[j] += (x * h01) >> top
        for j in range(num_images):
            level = min(np.int64(distance[j]), cap)
            out[i, j] = level if labelled[j] else unlabelled


if njit is not None:
    _levels_table = njit(cache=True, nogil=True)(_levels_table)


def levels_table(labels: torch.Tensor, labelled: torch.Tensor, max_zeta: int) -> torch.Tensor:
    """The int8 ``(N, N)`` level table of :class:`hf_pcme.metrics.plausibility.Plausibility` (CPU)."""
    num_images = labels.shape[0]
    out = np.empty((num_images, num_images), np.int8)
    _levels_table(np.ascontiguousarray(pack_labels(labels).T), labelled.cpu().numpy(), int(max_zeta), out)
    return torch.from_numpy(out)
