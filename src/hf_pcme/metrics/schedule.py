"""Where the score blocks come from, and in which order they are ranked: one product or two passes.

The metrics of both directions need every score twice: as rows of the ``(num_images, num_texts)``
matrix (i2t: images as queries) and as its columns (t2i: captions as queries).

- **One product** (the matrix fits ``max_memory``; scorers that compute an inner product):
  the matrix is computed once, in blocks of image rows; each block is ranked for i2t as soon as
  it is written (still in cache), and once every block is in, the t2i blocks are transposed
  copies of column ranges of the held matrix. Cost: one matrix product plus the ranking.
- **Two passes** (otherwise, and for the sampled scorer, whose two orientations are not the same
  floating-point computation): every block is computed where it is ranked, from the image side
  for i2t and from the caption side for t2i, so the matrix is never held. Cost: two products.

Both give the same metrics: the i2t blocks are the same products, and a t2i block of the two-pass
path (``captions[rows] @ images.T``) holds the same float32 values as the transposed columns of
``images @ captions.T`` (both are dot products over the same ``D`` dimensions in the same order;
the tests compare the two paths exactly, and each with the definitions).

On CPU each task (a chunk of query rows) is scored and ranked on one worker thread with torch on
one CPU thread (see :mod:`hf_pcme.metrics.ranking`), so chunks balance across cores with no
barrier between products and ranking; the one-product path has one barrier, between the
directions. On GPU: one worker, large blocks for the matrix product.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .layout import DIRECTIONS, Layout
from .rank_types import Workspace
from .ranking import single_cpu_thread
from .scorers import InnerProductScorer, MatrixScores, ScoreSource

ONE_PRODUCT, TWO_PASSES, GIVEN_MATRIX = "one product", "two passes", "given matrix"


@dataclass(frozen=True)
class Task:
    """A chunk of query rows of one direction (and fold), ranked in pieces of ``sub_rows`` rows."""

    direction: str
    fold: int
    rows: range
    sub_rows: int
    fold_columns: tuple[int, int] | None

    def pieces(self) -> list[range]:
        return [range(s, min(s + self.sub_rows, self.rows.stop)) for s in range(self.rows.start, self.rows.stop, self.sub_rows)]


def score_path(source: ScoreSource, max_memory: int) -> str:
    """Which path :func:`hf_pcme.metrics.evaluate_retrieval` takes for this source and budget."""
    if not isinstance(source, InnerProductScorer):
        # a given matrix is already held; the sampled scorer's two orientations differ in rounding
        return GIVEN_MATRIX if isinstance(source, MatrixScores) else TWO_PASSES
    matrix_bytes = source.num_images * source.num_texts * torch.finfo(torch.float32).bits // 8
    return ONE_PRODUCT if matrix_bytes <= max_memory else TWO_PASSES


def plan_tasks(
    layout: Layout, chunk_size: int | None, coco: bool, block_elements: int, sub_block_elements: int
) -> list[Task]:
    """Every chunk of both directions, in a fixed order (i2t first): the sums do not depend on timing.

    A chunk (the rows one worker scores at once) holds about ``block_elements`` scores, or
    ``chunk_size`` rows; it is ranked in pieces of about ``sub_block_elements`` scores.
    """
    tasks = []
    for direction in DIRECTIONS:
        num_items = layout.num_texts if direction == "i2t" else layout.num_images
        block_rows = int(chunk_size) if chunk_size else max(1, block_elements // num_items)
        sub_rows = max(1, sub_block_elements // num_items)
        if direction == "t2i" and layout.group_size and not chunk_size:
            # whole images per piece: their captions then share the plausibility rows (see ranking.py)
            block_rows = max(1, block_rows // layout.group_size) * layout.group_size
            sub_rows = max(1, sub_rows // layout.group_size) * layout.group_size
        multiple = layout.group_size if direction == "t2i" else 1
        for fold, (query_range, item_range) in enumerate(layout.fold_ranges(direction)):
            size = even_chunk(query_range[1] - query_range[0], block_rows, multiple)
            for start in range(query_range[0], query_range[1], size):
                rows = range(start, min(start + size, query_range[1]))
                tasks.append(Task(direction, fold, rows, sub_rows, item_range if coco else None))
    return tasks


def even_chunk(num_rows: int, max_rows: int, multiple: int | None) -> int:
    """Rows per chunk: at most ``max_rows``, the same for every chunk of ``num_rows`` (no small last
    chunk, which would be a slow product), a multiple of ``multiple`` where possible."""
    chunks = -(-num_rows // max_rows)
    size = -(-num_rows // chunks)
    if multiple and multiple > 1 and max_rows % multiple == 0:
        size = -(-size // multiple) * multiple
    return max(1, size)


#: ``rank(block, block_start, piece, task, workspace)`` -> the ranked piece (``rank_block``'s pair).
RankPiece = Callable[[torch.Tensor, int, range, Task, Workspace], tuple]


def run_tasks(
    source: ScoreSource, tasks: list[Task], rank: RankPiece, num_workers: int, path: str
) -> Iterator[tuple[Task, list[tuple]]]:
    """Score and rank every task on ``num_workers`` threads; yields ``(task, ranked pieces)`` in task order."""
    device = source.device
    local = threading.local()

    def workspace() -> Workspace:
        if not hasattr(local, "workspace"):
            local.workspace = Workspace()
        return local.workspace

    def score_and_rank(task: Task, block_of: Callable[[Task, Workspace], torch.Tensor]) -> list:
        space = workspace()
        block = block_of(task, space)
        return [rank(block, task.rows.start, piece, task, space) for piece in task.pieces()]

    def rank_held_columns(task: Task, matrix: torch.Tensor) -> list:
        # one transposed copy per piece: the ranking then reads it from the cache
        space = workspace()
        return [rank(_held_columns(matrix, piece, space), piece.start, piece, task, space) for piece in task.pieces()]

    with single_cpu_thread(device), ThreadPoolExecutor(max_workers=num_workers) as pool:
        if path != ONE_PRODUCT:
            futures = [pool.submit(score_and_rank, task, lambda t, s: _computed_rows(source, t, s)) for task in tasks]
            yield from zip(tasks, (future.result() for future in futures))
            return
        matrix = torch.empty((source.num_images, source.num_texts), dtype=torch.float32, device=device)
        i2t = [task for task in tasks if task.direction == "i2t"]
        t2i = [task for task in tasks if task.direction == "t2i"]
        # the i2t tasks cover every image row: when they are done, the whole matrix is held
        futures = [pool.submit(score_and_rank, task, lambda t, s: _held_rows(source, matrix, t)) for task in i2t]
        done = [future.result() for future in futures]  # the barrier between the directions
        futures = [pool.submit(rank_held_columns, task, matrix) for task in t2i]
        yield from zip(i2t, done)
        yield from zip(t2i, (future.result() for future in futures))


def _computed_rows(source: ScoreSource, task: Task, workspace: Workspace) -> torch.Tensor:
    """Two passes: the task's score rows, computed from its own side into a reused buffer."""
    num_items = source.num_texts if task.direction == "i2t" else source.num_images
    shape = (len(task.rows), num_items)
    out = workspace.get("block", shape[0] * shape[1], torch.float32, source.device).view(shape)
    rows = slice(task.rows.start, task.rows.stop)
    return source.image_rows(rows, out=out) if task.direction == "i2t" else source.text_rows(rows, out=out)


def _held_rows(source: ScoreSource, matrix: torch.Tensor, task: Task) -> torch.Tensor:
    """One product: the task's image rows, computed straight into the held matrix."""
    rows = matrix[task.rows.start : task.rows.stop]
    block = source.image_rows(slice(task.rows.start, task.rows.stop), out=rows)
    if block.data_ptr() != rows.data_ptr():  # a scorer that could not write in place (K x K best pair)
        if block.dtype != rows.dtype:
            raise RuntimeError(f"the one-product path holds float32 scores; the scorer returned {block.dtype}.")
        rows.copy_(block)
    return rows


def _held_columns(matrix: torch.Tensor, captions: range, workspace: Workspace) -> torch.Tensor:
    """One product: captions as rows, a transposed copy of the held matrix's columns."""
    shape = (len(captions), matrix.shape[0])
    out = workspace.get("block", shape[0] * shape[1], matrix.dtype, matrix.device).view(shape)
    return out.copy_(matrix[:, captions.start : captions.stop].t())
