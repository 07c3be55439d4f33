"""Approximate CSD search (FAISS IVF-Flat, IVF-PQ, HNSW + exact re-scoring) against exact CSD search.

For each gallery size and data model, one exact index (``CrossModalIndex(backend="torch")``, the
fastest exact search in ``bench_index.py``) and the approximate ones (``with_faiss_index``: the
same search vectors, no copy of the means) answer the same batch of queries. Reported per
setting: recall@10 against the exact top 10 of the same run, ms per query (median over repeats of
one batched call, exact and approximate timed in turn within each repeat, so drift hits both
sides), the speed-up ``exact ms / approximate ms``, build seconds and bytes per item. Every
approximate result is re-scored exactly (``k' = candidate_factor * 10`` candidates).

Data (D = 1024, ranked by PCME++'s closed-form sampled distance, CSD), two generative models:

- ``gmm`` (the main case): a mixture of C = 1024 Gaussian clusters; centres uniform on the unit
  sphere; an item's mean is ``normalize(centre + s * eps)``, ``eps ~ N(0, I / D)``, ``s = 1``
  (noise as large as the centre: an item's cosine to its centre is about 0.7, to another item
  of its cluster about 0.5); cluster drawn uniformly per item.
- ``isotropic`` (the worst case): ``normalize(N(0, I))`` means, no structure for an index to use.

Both: per-item log variance ``log sigma^2 = l`` on every dimension, ``l ~ U[-9, -7]`` (sum sigma^2
from 0.13 to 0.93 at D = 1024, the same order as the squared distances between neighbours, so the
variance term reorders neighbours without dominating). CSD depends on log sigma^2 only through
sum sigma^2, so one value per item ranks exactly like any per-dimension profile with the same sum
(and takes no memory: an expanded view). Queries (256) are fresh draws from the same model.
These parameters were fixed before any measurement.

Index options: ``nlist = sqrt(N)`` (k-means on 64 points per cell, and per PQ codebook entry, of
a fixed random sample), IVF-PQ ``pq_m = 128`` (8-dim sub-vectors, 8 bits; codes of 129 bytes with
CSD's extra coordinate), HNSW ``hnsw_m = 32``, ``ef_construction = 40``; ``candidate_factor = 4``. HNSW is built only up to
``--hnsw-max`` items (default 100k): its build is single inserts, measured at the smaller sizes.

Memory: at 1M items the means (4 GB) and the exact index's vectors (4 GB) exist together only
while the exact index is built; the means are then dropped, and one approximate index at a time
is alive next to the exact one (IVF-PQ shares the exact vectors). Run the 1M size with ``nice``.

    python benchmarks/bench_index_ann.py                    # 10k, 100k, 1M; gmm and isotropic
    python benchmarks/bench_index_ann.py --quick            # 10k only
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time

import torch

from hf_pcme.index import AnnOptions, CrossModalIndex
from _memory import available_memory  # benchmarks/ is on sys.path when run as a script

GIB = 1024**3
NUM_CLUSTERS = 1024
CLUSTER_SPREAD = 1.0
LOG_SIGMA2_RANGE = (-9.0, -7.0)


def make_means(num: int, dim: int, data: str, generator: torch.Generator, centres: torch.Tensor) -> torch.Tensor:
    """Unit means of the stated generative model, filled block by block (no N x D temporaries)."""
    mean = torch.empty(num, dim)
    for start in range(0, num, 65536):
        block = mean[start : start + 65536]
        block.normal_(generator=generator)
        if data == "gmm":
            block.mul_(CLUSTER_SPREAD / math.sqrt(dim))
            block.add_(centres[torch.randint(len(centres), (block.shape[0],), generator=generator)])
        block.div_(block.norm(dim=-1, keepdim=True))
    return mean


def make_log_sigma2(num: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """One log variance per item on every dimension (an expanded view: no N x D memory)."""
    level = torch.empty(num, 1).uniform_(*LOG_SIGMA2_RANGE, generator=generator)
    return level.expand(num, dim)


def recall_at_k(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over queries of |approximate top k ∩ exact top k| / k."""
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, exact))
    return hits / exact.numel()


def settings(index_type: str, nlist: int, args: argparse.Namespace) -> list[tuple[str, int]]:
    """The search options swept for one index type: (attribute, value)."""
    if index_type == "hnsw":
        return [("ef_search", v) for v in args.ef_search]
    return [("nprobe", v) for v in args.nprobe if v <= nlist]


def bench(num_items: int, data: str, args: argparse.Namespace) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(NUM_CLUSTERS, args.dim, generator=generator), dim=-1)
    query_mean = make_means(args.queries, args.dim, data, generator, centres)
    query_log_sigma2 = make_log_sigma2(args.queries, args.dim, generator)
    mean = make_means(num_items, args.dim, data, generator, centres)
    start = time.perf_counter()
    exact = CrossModalIndex.from_embeddings(mean, make_log_sigma2(num_items, args.dim, generator), metric="csd")
    rows = [{"type": "exact (torch)", "build_s": time.perf_counter() - start, "bytes": exact.nbytes() / num_items}]
    del mean
    gc.collect()

    def run_exact() -> torch.Tensor:
        return exact.search(query_mean, query_log_sigma2, top_k=args.top_k).indices

    reference = run_exact()
    nlist = max(1, int(math.sqrt(num_items)))
    options = AnnOptions(pq_m=128, hnsw_m=32, ef_construction=40, candidate_factor=4, train_points_per_cell=64)
    for index_type in args.types:
        if index_type == "hnsw" and num_items > args.hnsw_max:
            rows.append({"type": index_type, "skipped": f"N > --hnsw-max={args.hnsw_max} (build time; see smaller N)"})
            continue
        start = time.perf_counter()
        ann = exact.with_faiss_index(index_type, nlist=nlist, nprobe=1, ann_options=options)
        build = time.perf_counter() - start
        sweep = settings(index_type, nlist, args)

        def run_ann(setting: tuple[str, int], ann: CrossModalIndex = ann) -> torch.Tensor:
            setattr(ann, *setting)
            return ann.search(query_mean, query_log_sigma2, top_k=args.top_k).indices

        found = {s: run_ann(s) for s in sweep}  # warm-up, and the results for recall
        exact_times, ann_times = [], {s: [] for s in sweep}
        for _ in range(args.repeats):  # interleaved: exact, then every setting, in each repeat
            start = time.perf_counter()
            run_exact()
            exact_times.append(time.perf_counter() - start)
            for s in sweep:
                start = time.perf_counter()
                run_ann(s)
                ann_times[s].append(time.perf_counter() - start)
        exact_ms = statistics.median(exact_times) / args.queries * 1e3
        for s in sweep:
            ms = statistics.median(ann_times[s]) / args.queries * 1e3
            rows.append({"type": index_type, "setting": f"{s[0]}={s[1]}", "build_s": build,
                         "bytes": ann.nbytes() / num_items,
                         "recall": recall_at_k(found[s], reference), "ms": ms, "exact_ms": exact_ms,
                         "speedup": exact_ms / ms, "nlist": nlist if index_type != "hnsw" else None})
        del ann
        gc.collect()
    return rows


def print_rows(num_items: int, data: str, rows: list[dict], top_k: int) -> None:
    print(f"\nN = {num_items:,} items, data = {data}")
    header = (f"{'index':<14} {'setting':<14} {'nlist':>6} {'build s':>8} {'B/item':>8} {f'recall@{top_k}':>10} "
              f"{'ms/query':>9} {'exact ms/query':>15} {'speed-up':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        if "skipped" in row:
            print(f"{row['type']:<14} skipped: {row['skipped']}")
        elif "setting" not in row:
            print(f"{row['type']:<14} {'':<14} {'':>6} {row['build_s']:>8.1f} {row['bytes']:>8.0f}")
        else:
            nlist = "" if row["nlist"] is None else str(row["nlist"])
            print(f"{row['type']:<14} {row['setting']:<14} {nlist:>6} {row['build_s']:>8.1f} {row['bytes']:>8.0f} "
                  f"{row['recall']:>10.3f} {row['ms']:>9.3f} {row['exact_ms']:>15.3f} {row['speedup']:>8.1f}x")
    met = [r for r in rows if r.get("recall", 0) >= 0.95 and r.get("speedup", 0) >= 10]
    best = max(met, key=lambda r: r["speedup"], default=None)
    print("target (recall@10 >= 0.95 at >= 10x fewer ms/query):",
          f"met by {best['type']} {best['setting']} ({best['recall']:.3f}, {best['speedup']:.1f}x)"
          if best else "not met")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--data", nargs="+", choices=("gmm", "isotropic"), default=["gmm", "isotropic"])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=256, help="queries per batched call")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--types", nargs="+", choices=("ivf", "ivf_pq", "hnsw"), default=["ivf", "ivf_pq", "hnsw"])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="IVF settings swept")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[40, 64, 128, 256], help="HNSW settings swept")
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="largest N at which HNSW is built")
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and FAISS")
    parser.add_argument("--quick", action="store_true", help="10k items only")
    args = parser.parse_args()
    if args.quick:
        args.sizes = [10_000]

    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    print(f"CSD search, D={args.dim}, top_k={args.top_k}, {args.queries} queries per batched call; "
          f"torch/faiss threads={args.threads}, cpus={os.cpu_count()}; median of {args.repeats} interleaved repeats")
    print(f"data: gmm = {NUM_CLUSTERS} clusters, spread s={CLUSTER_SPREAD}; isotropic = normalize(N(0, I)); "
          f"log sigma^2 per item ~ U{list(LOG_SIGMA2_RANGE)}")
    for num_items in args.sizes:
        needed = 2 * num_items * (args.dim + 1) * 4 + GIB
        if available_memory() < needed:
            free = available_memory() / GIB
            print(f"\nN = {num_items:,}: skipped, needs ~{needed / GIB:.1f} GiB free, {free:.1f} available")
            continue
        for data in args.data:
            print_rows(num_items, data, bench(num_items, data, args), args.top_k)


if __name__ == "__main__":
    main()
