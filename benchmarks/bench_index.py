"""Corpus search speed and memory: FAISS flat vs our chunked torch search vs a naive full matrix.

Random Gaussian embeddings (unit means, log variances uniform in [-7, -3]), D = 1024, ranked by
PCME++'s closed-form sampled distance (CSD; ``--metric cosine`` for the cosine). Three exact
searches of the same top-k:

- naive: ``hf_pcme.distances.pairwise_csd`` on the whole (Q, N) matrix, then ``topk``: every call
  re-reads the means and the log variances (exp, squares) of all N items;
- torch: ``CrossModalIndex(backend="torch")``: one matrix product per item block on the augmented
  vectors ``[2 mu, -(|mu|^2 + sum sigma^2)]`` (docs/formulas.md, "CSD as an inner product") + a running top-k;
- faiss: ``CrossModalIndex(backend="faiss")``: ``IndexFlatIP`` on the same augmented vectors.

Latency per query is measured for a single query (Q = 1, a retrieval service) and per query in a
batch (``--queries``, default 64), with the throughput of the batch; memory is the bytes per item
of the searched vectors and of everything kept (including the per-dimension log variances that
the match probability needs). All timings of one size come from the same run, so the ratios hold
even on a busy machine; the absolute numbers do not.

    python benchmarks/bench_index.py                 # 10k, 100k, 1M items
    python benchmarks/bench_index.py --quick         # 10k only
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable

import torch

from hf_pcme.distances import pairwise_csd
from hf_pcme.index import CrossModalIndex
from _memory import available_memory  # benchmarks/ is on sys.path when run as a script

GIB = 1024**3




def random_corpus(num_items: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm means and log variances in [-7, -3], made in place (no N x D temporaries)."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.empty(num_items, dim).normal_(generator=generator)
    log_sigma2 = torch.empty(num_items, dim).uniform_(-7.0, -3.0, generator=generator)
    for start in range(0, num_items, 65536):
        block = mean[start : start + 65536]
        block.div_(block.norm(dim=-1, keepdim=True))
    return mean, log_sigma2


def naive_search(query_mean, query_log_sigma2, mean, log_sigma2, top_k: int, metric: str) -> torch.Tensor:
    """The whole (Q, N) score matrix at once, then top-k."""
    if metric == "csd":
        scores = -pairwise_csd(query_mean, query_log_sigma2, mean, log_sigma2)
    else:
        normalize = torch.nn.functional.normalize
        scores = normalize(query_mean, dim=-1) @ normalize(mean, dim=-1).t()
    return scores.topk(top_k, dim=1).indices


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of queries whose top-k id sets are equal."""
    return sum(set(x.tolist()) == set(y.tolist()) for x, y in zip(a, b)) / a.shape[0]


def bench_size(num_items: int, args: argparse.Namespace) -> list[dict]:
    dim, metric = args.dim, args.metric
    rows = []
    mean, log_sigma2 = random_corpus(num_items, dim, seed=0)
    query_mean, query_log_sigma2 = random_corpus(args.queries, dim, seed=1)
    single = (query_mean[:1], query_log_sigma2[:1])
    batch = (query_mean, query_log_sigma2)
    repeats = args.repeats if num_items < 1_000_000 else max(1, args.repeats // 2)
    item_bytes = dim * 4
    reference = None

    # naive: needs the inputs plus about one more N x D float32 temporary (exp / squares)
    needed = num_items * dim * 4 + GIB
    if available_memory() < needed:
        free = available_memory() / GIB
        rows.append({"method": "naive", "skipped": f"needs ~{needed / GIB:.1f} GiB free, {free:.1f} available"})
    else:
        def run(q):
            return naive_search(q[0], q[1], mean, log_sigma2, args.top_k, metric)

        t1, _ = timed(lambda: run(single), repeats)
        tq, reference = timed(lambda: run(batch), repeats)
        kept = 2 * item_bytes if metric == "csd" else item_bytes
        rows.append({"method": "naive", "build_s": 0.0, "single_ms": t1 * 1e3, "batch_ms": tq / args.queries * 1e3,
                     "throughput": args.queries / tq, "search_bytes": kept, "kept_bytes": kept, "agree": 1.0})
        gc.collect()

    for backend in ("torch", "faiss"):
        needed = num_items * (dim + 1) * 4 + GIB
        if available_memory() < needed:
            rows.append({"method": backend, "skipped": f"needs ~{needed / GIB:.1f} GiB free"})
            continue
        start = time.perf_counter()
        index = CrossModalIndex.from_embeddings(
            mean, log_sigma2 if metric == "csd" else None, metric=metric, backend=backend
        )
        build = time.perf_counter() - start

        def run(q, index=index):
            return index.search(q[0], q[1] if metric == "csd" else None, top_k=args.top_k).indices

        t1, _ = timed(lambda: run(single), repeats)
        tq, found = timed(lambda: run(batch), repeats)
        if reference is None:
            reference = found
        search_bytes = index.nbytes() / num_items
        kept = search_bytes + (item_bytes + 4 if index.log_sigma2 is not None else 0)  # + log sigma^2, uncertainty
        rows.append({"method": backend, "build_s": build, "single_ms": t1 * 1e3, "batch_ms": tq / args.queries * 1e3,
                     "throughput": args.queries / tq, "search_bytes": search_bytes, "kept_bytes": kept,
                     "agree": agreement(found, reference)})
        del index
        gc.collect()
    del mean, log_sigma2
    gc.collect()
    return rows


def print_table(num_items: int, rows: list[dict]) -> None:
    base = next((r for r in rows if r["method"] == "naive" and "skipped" not in r), None)
    torch_row = next((r for r in rows if r["method"] == "torch" and "skipped" not in r), None)
    print(f"\nN = {num_items:,} items")
    header = (f"{'method':<7} {'build s':>8} {'1 query ms':>11} {'ms/query (batch)':>17} {'queries/s':>10} "
              f"{'x naive (1/batch)':>18} {'x torch (1/batch)':>18} {'B/item searched':>16} {'B/item kept':>12} "
              f"{'same top-k':>10}")
    print(header)
    print("-" * len(header))
    for row in rows:
        if "skipped" in row:
            print(f"{row['method']:<7} skipped: {row['skipped']}")
            continue

        def ratio(other):
            if other is None:
                return "n/a"
            return f"{other['single_ms'] / row['single_ms']:.2f} / {other['batch_ms'] / row['batch_ms']:.2f}"

        print(f"{row['method']:<7} {row['build_s']:>8.2f} {row['single_ms']:>11.2f} {row['batch_ms']:>17.3f} "
              f"{row['throughput']:>10.0f} {ratio(base):>18} {ratio(torch_row):>18} {row['search_bytes']:>16.0f} "
              f"{row['kept_bytes']:>12.0f} {row['agree']:>10.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=64, help="queries per batch")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--metric", choices=("csd", "cosine"), default="csd")
    parser.add_argument("--threads", type=int, default=None, help="threads for torch and FAISS (default: theirs)")
    parser.add_argument("--quick", action="store_true", help="10k items only, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats = [10_000], 3

    import faiss

    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)

    print(f"metric={args.metric} D={args.dim} top_k={args.top_k} batch={args.queries} queries; "
          f"torch threads={torch.get_num_threads()}, faiss threads={faiss.omp_get_max_threads()}, "
          f"cpus={os.cpu_count()}; median of {args.repeats} (1M: {max(1, args.repeats // 2)}) after a warm-up")
    print("x naive / x torch = speed-up over that method (>1 = faster), for 1 query / per query in a batch")
    for num_items in args.sizes:
        print_table(num_items, bench_size(num_items, args))


if __name__ == "__main__":
    main()
