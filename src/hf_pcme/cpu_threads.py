"""Torch on one CPU thread inside a block, for code that runs its own worker threads.

Shipped as remote code with the model-side files that use it: flat, no package imports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_cpu_thread(device: torch.device | None = None) -> Iterator[None]:
    """Run torch CPU ops on one thread inside the block (restored afterwards); no-op off CPU.

    Worker threads that each call torch would otherwise each fan out to torch's whole thread pool,
    and the threads would wait on each other at every operation.
    """
    if device is not None and device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
