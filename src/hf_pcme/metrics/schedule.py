"""Where the score blocks come from, and in which order they are ranked: one product or two passes.

The metrics of both directions need every score twice: as rows of the ``(num_images, num_texts)``
matrix (i2t: images as queries) and as its columns (t2i: captions as queries).

- **One product** (the float32 matrix fits ``max_memory``; scorers that compute an inner
  product): the matrix is computed once, by one matrix product with torch's threads (the bare
  matmul itself), then every chunk of queries is only ranked: i2t chunks are row ranges of the
  held matrix, t2i pieces transposed copies of its column ranges (a few MB each, ranked while
  in cache). Cost: one matrix product plus the ranking.
- **Two passes** (otherwise, and for the sampled scorer, whose two orientations are different
  floating-point computations): every chunk is computed where it is ranked, from the image side
  for i2t and from the caption side for t2i, so the matrix is never held. Cost: two products.

Both give the same metrics when the BLAS sums each dot product in the same order whatever the
shape and orientation of the product, which MKL (torch's CPU BLAS) does except for products of
only a few rows (the chunking never makes those: no small last chunk).
tests/test_metrics_one_product.py compares the paths exactly (and with embeddings whose dot
products are exact in any order, which pins the ranking logic whatever the BLAS). On GPU, cuBLAS
picks its kernels by shape, so the paths may differ in a score's last bit (not checked here: no
GPU in the test environment), which can move a metric only where two scores tie within that bit.

On CPU each chunk is scored (two passes) and ranked on one worker thread with torch on one CPU
thread (see :mod:`hf_pcme.metrics.ranking`), so chunks balance across cores with no barrier.
On GPU: one worker, large blocks for the matrix product.
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
#: Rows of the held matrix per band of a transposed copy (see :func:`_held_columns`).
TRANSPOSE_ROWS = 128


@dataclass(frozen=True)
class Task:
    """A chunk of query rows of one direction (and fold), ranked in pieces of ``sub_rows`` rows."""

    direction: str
    fold: int
    rows: range
    sub_rows: int
    fold_columns: tuple[int, int] | None

    def pieces(self) -> list[range]:
        """The rows in pieces of ``sub_rows`` (the last one may be shorter)."""
        starts = range(self.rows.start, self.rows.stop, self.sub_rows)
        return [range(start, min(start + self.sub_rows, self.rows.stop)) for start in starts]


def score_path(source: ScoreSource, max_memory: int) -> str:
    """Which path :func:`hf_pcme.metrics.evaluate_retrieval` takes for this source and budget."""
    if not isinstance(source, InnerProductScorer):
        # a given matrix is already held; the sampled scorer's two orientations differ in rounding
        return GIVEN_MATRIX if isinstance(source, MatrixScores) else TWO_PASSES
    matrix_bytes = source.num_images * source.num_texts * torch.finfo(torch.float32).bits // 8
    return ONE_PRODUCT if matrix_bytes <= max_memory else TWO_PASSES


def plan_tasks(
    layout: Layout, chunk_size: int | None, coco: bool, block_elements: int, sub_block_elements: int, workers: int = 1
) -> list[Task]:
    """Every chunk of both directions, in a fixed order (i2t first): the sums do not depend on timing.

    A chunk (the rows one worker scores at once) holds about ``block_elements`` scores, or
    ``chunk_size`` rows; it is ranked in pieces of about ``sub_block_elements`` scores. Large
    chunks are split so that each direction has a multiple of ``workers`` tasks: a last round
    with fewer tasks than workers would leave cores idle.
    """
    tasks = []
    for direction in DIRECTIONS:
        num_items = layout.num_texts if direction == "i2t" else layout.num_images
        block_rows = int(chunk_size) if chunk_size else max(1, block_elements // num_items)
        sub_rows = max(1, sub_block_elements // num_items)
        multiple = layout.group_size if direction == "t2i" and layout.group_size else 1
        if direction == "t2i" and layout.group_size and not chunk_size:
            # whole images per piece: their captions then share the plausibility rows (see ranking.py)
            block_rows = max(1, block_rows // multiple) * multiple
            sub_rows = max(1, sub_rows // multiple) * multiple
        folds = layout.fold_ranges(direction)
        if not chunk_size:
            block_rows = _balanced_rows(folds, block_rows, workers, multiple, min_rows=sub_rows)
        for fold, (query_range, item_range) in enumerate(folds):
            size = even_chunk(query_range[1] - query_range[0], block_rows, multiple)
            for start in range(query_range[0], query_range[1], size):
                rows = range(start, min(start + size, query_range[1]))
                tasks.append(Task(direction, fold, rows, sub_rows, item_range if coco else None))
    return tasks


def _balanced_rows(folds, block_rows: int, workers: int, multiple: int, min_rows: int) -> int:
    """``block_rows``, lowered so that the chunks of all folds are a multiple of ``workers`` (if the
    chunks keep at least ``min_rows`` rows, one ranking piece: smaller products lose speed)."""
    fold_rows = max(end - start for (start, end), _ in folds)
    chunks = -(-fold_rows // block_rows) * len(folds)
    if workers <= 1 or chunks % workers == 0:
        return block_rows
    per_fold = -(-(-(-chunks // workers) * workers) // len(folds))
    rows = -(-(-(-fold_rows // per_fold)) // multiple) * multiple
    return rows if rows >= min_rows else block_rows


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

    def score_and_rank(task: Task) -> list:
        space = workspace()
        block = _computed_rows(source, task, space)
        return [rank(block, task.rows.start, piece, task, space) for piece in task.pieces()]

    def rank_held(task: Task, matrix: torch.Tensor) -> list:
        space = workspace()
        if task.direction == "i2t":
            return [rank(matrix, 0, piece, task, space) for piece in task.pieces()]
        # t2i: one transposed copy per piece, which the ranking then reads from the cache
        return [rank(_held_columns(matrix, piece, space), piece.start, piece, task, space) for piece in task.pieces()]

    if path == ONE_PRODUCT:
        # the whole matrix first, as the bare matmul (torch's threads); then every task only ranks
        matrix = _held_matrix(source, tasks)
        with single_cpu_thread(device), ThreadPoolExecutor(max_workers=num_workers) as pool:
            futures = [pool.submit(rank_held, task, matrix) for task in tasks]
            yield from zip(tasks, (future.result() for future in futures))
        return
    with single_cpu_thread(device), ThreadPoolExecutor(max_workers=num_workers) as pool:
        futures = [pool.submit(score_and_rank, task) for task in tasks]
        yield from zip(tasks, (future.result() for future in futures))


def _held_matrix(source: InnerProductScorer, tasks: list[Task]) -> torch.Tensor:
    """One product: the whole ``(num_images, num_texts)`` float32 matrix, written in place."""
    matrix = torch.empty((source.num_images, source.num_texts), dtype=torch.float32, device=source.device)
    if not source.polysemous:
        _held_rows(source, matrix, range(source.num_images))
        return matrix
    # K x K best pair: the product of K * rows x K * texts vectors is K^2 times a block; in chunks
    for task in tasks:
        if task.direction == "i2t":
            _held_rows(source, matrix, task.rows)
    return matrix


def _computed_rows(source: ScoreSource, task: Task, workspace: Workspace) -> torch.Tensor:
    """Two passes: the task's score rows, computed from its own side into a reused buffer."""
    num_items = source.num_texts if task.direction == "i2t" else source.num_images
    shape = (len(task.rows), num_items)
    out = workspace.get("block", shape[0] * shape[1], torch.float32, source.device).view(shape)
    rows = slice(task.rows.start, task.rows.stop)
    return source.image_rows(rows, out=out) if task.direction == "i2t" else source.text_rows(rows, out=out)


def _held_rows(source: ScoreSource, matrix: torch.Tensor, images: range) -> None:
    """One product: the scores of the ``images`` rows, computed straight into the held matrix."""
    rows = matrix[images.start : images.stop]
    block = source.image_rows(slice(images.start, images.stop), out=rows)
    if block.data_ptr() != rows.data_ptr():  # a scorer that could not write in place (K x K best pair)
        if block.dtype != rows.dtype:
            raise RuntimeError(f"the one-product path holds float32 scores; the scorer returned {block.dtype}.")
        rows.copy_(block)


def _held_columns(matrix: torch.Tensor, captions: range, workspace: Workspace) -> torch.Tensor:
    """One product: captions as rows, a transposed copy of the held matrix's columns.

    Copied in bands of ``TRANSPOSE_ROWS`` matrix rows: a plain transposed copy walks down whole
    columns, one memory page per score (rows are ``num_texts`` floats apart), and spends its time
    in TLB misses; a band touches few pages (measured 5-6x faster at COCO 5K).
    """
    shape = (len(captions), matrix.shape[0])
    out = workspace.get("block", shape[0] * shape[1], matrix.dtype, matrix.device).view(shape)
    for start in range(0, matrix.shape[0], TRANSPOSE_ROWS):
        band = matrix[start : start + TRANSPOSE_ROWS, captions.start : captions.stop]
        out[:, start : start + band.shape[0]].copy_(band.t())
    return out
