"""Benchmark: ranking by PCME's sampled match probability vs the bare matmul of the means.

What is timed, per size (N images x 5 N captions, D dims, J = 7 samples per item, a = b = 15):
  bare matmul: ``image_means @ text_means.T`` (float32, a fresh (N, 5N) output), the reference;
  ours: ``SampledMatchScorer.image_rows`` over all N image rows, in row chunks of ~16M scores into
    one reused buffer as ``evaluate_retrieval`` asks for them (``hf_pcme.sampled_match``: J' products
    per tile of the stacked samples, the sigmoid-mean fused per cache-sized tile);
  today's: the same blocks from ``SampledMatchScore.pairwise`` (``hf_pcme.distances``), the path
    ``SampledMatchScorer`` used before; on all rows where that takes under ``--todays-budget``
    seconds, else on a slice of rows, extrapolated linearly (its cost is exactly linear in the rows).
The sides are interleaved (matmul, ours, matmul, ours, ...) and the median of the per-pair ratios
is reported, with the best/best ratio (the machine drifts +-15 % and is often shared). Torch's
default thread count on both sides.

Top-K re-ranking (``SampledMatchScorer(rerank_top_k=K)``: rank by -CSD, re-score each query's top
K by the sampled log p), for each ``--rerank-k``: its time, and its agreement with the exact ranking
(identical top 1 / top 10, Recall@1/5/10) over all rows.

Agreement of ours with today's, on the rows today's path scored: the largest score difference,
the share of rows whose top 10 (and whose whole ranking) is identical, and Recall@1/5/10 (i2t) of
both. The floor of any exact computation is the J x J = 49 products of the samples (~49x).

    python benchmarks/bench_sampled_ranking.py           # 1000, 2000, 5000 images (5000 x 25000 is COCO 5K), D = 1024
    python benchmarks/bench_sampled_ranking.py --quick   # 200, 400, 800 images, D = 256
    python benchmarks/bench_sampled_ranking.py --sizes 5000 --todays-budget 0   # COCO 5K only (today's on 8 rows)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from hf_pcme.metrics.scorers import SampledMatchScorer
from hf_pcme.scoring import SampledMatchScore

CAPTIONS = 5
NUM_SAMPLES = 7
SCALE = SHIFT = 15.0
#: Scores per row chunk, as evaluate_retrieval asks for them on CPU (metrics.retrieval.CPU_CHUNK_ELEMENTS).
CHUNK_ELEMENTS = 1 << 24


def make_scorer(num_images: int, dim: int, seed: int = 0) -> tuple[SampledMatchScorer, dict]:
    """Random unit means, log variances around -7 (as benchmarks/bench_metrics.py) and J = 7 samples."""
    g = torch.Generator().manual_seed(seed)
    num_texts = num_images * CAPTIONS
    image_means = F.normalize(torch.randn(num_images, dim, generator=g), dim=-1)
    # captions near their image, so that Recall@K means something
    text_means = F.normalize(image_means.repeat_interleave(CAPTIONS, 0) + torch.randn(num_texts, dim, generator=g), dim=-1)
    inputs = {
        "image_embeds": image_means,
        "text_embeds": text_means,
        "image_log_sigma2": torch.randn(num_images, dim, generator=g) * 0.5 - 7.0,
        "text_log_sigma2": torch.randn(num_texts, dim, generator=g) * 0.5 - 7.0,
    }
    scorer = SampledMatchScorer(**inputs, num_samples=NUM_SAMPLES, negative_scale=SCALE, shift=SHIFT, seed=seed)
    return scorer, inputs


def time_matmul(image_means: torch.Tensor, text_means: torch.Tensor) -> float:
    start = time.perf_counter()
    scores = image_means @ text_means.t()
    elapsed = time.perf_counter() - start
    del scores
    return elapsed


def score_rows(score_block, num_rows: int, num_items: int, keep_top: int = 10) -> tuple[float, torch.Tensor]:
    """Seconds to score rows 0..num_rows in chunks (only the scoring is timed); the top-``keep_top`` indices."""
    chunk = max(1, CHUNK_ELEMENTS // num_items)
    buffer = torch.empty(min(chunk, num_rows), num_items)
    elapsed, tops = 0.0, []
    for start in range(0, num_rows, chunk):
        rows = slice(start, min(start + chunk, num_rows))
        begin = time.perf_counter()
        block = score_block(rows, buffer[: rows.stop - rows.start])
        elapsed += time.perf_counter() - begin
        tops.append(block.topk(keep_top, dim=1).indices)
    return elapsed, torch.cat(tops)


def todays_block(scorer: SampledMatchScorer):
    score = SampledMatchScore(scorer.negative_scale, scorer.shift)

    def block(rows: slice, out: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return score.pairwise(scorer.image_samples[rows], scorer.text_samples)

    return block


def recall(tops: torch.Tensor, first_row: int = 0) -> dict[int, float]:
    images = torch.arange(first_row, first_row + tops.shape[0]).unsqueeze(1)
    hit = (tops // CAPTIONS) == images
    return {k: 100.0 * float(hit[:, :k].any(1).float().mean()) for k in (1, 5, 10)}


def run_size(num_images: int, dim: int, repeats: int, todays_budget: float, skip_todays: bool, rerank_ks) -> dict:
    scorer, inputs = make_scorer(num_images, dim)
    image_means, text_means = inputs["image_embeds"], inputs["text_embeds"]
    num_texts = num_images * CAPTIONS
    ours_block = lambda rows, out: scorer.image_rows(rows, out=out)  # noqa: E731
    score_rows(ours_block, min(num_images, 8), num_texts)  # warm-up
    matmul_runs, ours_runs = [], []
    for _ in range(repeats):
        matmul_runs.append(time_matmul(image_means, text_means))
        seconds, exact_tops = score_rows(ours_block, num_images, num_texts)
        ours_runs.append(seconds)
    result = {
        "size": (num_images, num_texts, dim),
        "matmul": statistics.median(matmul_runs),
        "ours": statistics.median(ours_runs),
        "ratio": statistics.median(o / m for o, m in zip(ours_runs, matmul_runs)),
        "best_ratio": min(ours_runs) / min(matmul_runs),
        "ours_runs": ours_runs,
        "matmul_runs": matmul_runs,
        "recall_exact": recall(exact_tops),
        "rerank": [],
    }
    for top_k in rerank_ks:
        reranking = SampledMatchScorer(
            **inputs, image_samples=scorer.image_samples, text_samples=scorer.text_samples,
            negative_scale=SCALE, shift=SHIFT, rerank_top_k=top_k,
        )  # fmt: skip
        matmul = time_matmul(image_means, text_means)
        seconds, tops = score_rows(lambda rows, out: reranking.image_rows(rows, out=out), num_images, num_texts)
        result["rerank"].append({
            "top_k": top_k, "seconds": seconds, "ratio": seconds / statistics.median([matmul, *matmul_runs]),
            "top10_same": float((tops == exact_tops).all(1).float().mean()),
            "top1_same": float((tops[:, 0] == exact_tops[:, 0]).float().mean()),
            "recall": recall(tops),
        })  # fmt: skip
    if skip_todays:
        return result
    # today's path: estimate from a few rows, then run as many rows as the budget allows
    probe_rows = max(1, min(num_images, 8))
    probe, _ = score_rows(todays_block(scorer), probe_rows, num_texts)
    rows = int(min(num_images, max(probe_rows, todays_budget / max(probe, 1e-9) * probe_rows)))
    matmul_before = time_matmul(image_means, text_means)
    todays_seconds, todays_tops = score_rows(todays_block(scorer), rows, num_texts)
    matmul_after = time_matmul(image_means, text_means)
    todays_full = todays_seconds * num_images / rows
    with torch.no_grad():
        ours_scores = scorer.image_rows(slice(0, min(rows, 64)))
        todays_scores = todays_block(scorer)(slice(0, min(rows, 64)), None)
    _, ours_tops = score_rows(ours_block, rows, num_texts)
    full_order_same = (
        torch.sort(ours_scores, dim=1, descending=True, stable=True).indices
        == torch.sort(todays_scores, dim=1, descending=True, stable=True).indices
    ).all(1)
    result.update(
        todays=todays_full,
        todays_rows=rows,
        todays_ratio=todays_full / statistics.median([matmul_before, matmul_after]),
        max_abs_diff=float((ours_scores - todays_scores).abs().max()),
        max_rel_diff=float(((ours_scores - todays_scores).abs() / todays_scores.abs().clamp_min(1e-30)).max()),
        top10_same=float((ours_tops == todays_tops).all(1).float().mean()),
        full_order_same_rows=int(full_order_same.sum()),
        full_order_rows=min(rows, 64),
        recall_ours=recall(ours_tops),
        recall_todays=recall(todays_tops),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200, 400, 800 images, D = 256")
    parser.add_argument("--sizes", type=int, nargs="+", help="numbers of images (captions: 5 each)")
    parser.add_argument("--dim", type=int, help="embedding size (default 1024; 256 with --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per size (default 3)")
    parser.add_argument("--todays-budget", type=float, default=60.0,
                        help="seconds of today's path per size; beyond, a slice of rows is extrapolated")  # fmt: skip
    parser.add_argument("--skip-todays", action="store_true", help="do not time today's path")
    parser.add_argument("--rerank-k", type=int, nargs="*", default=[50, 200],
                        help="top-K re-ranking modes to time and compare with the exact ranking (default 50 200)")  # fmt: skip
    args = parser.parse_args()
    sizes = args.sizes or ([200, 400, 800] if args.quick else [1000, 2000, 5000])
    dim = args.dim or (256 if args.quick else 1024)
    print(
        f"bench_sampled_ranking: J = {NUM_SAMPLES}, a = b = {SCALE:g}, D = {dim}, {CAPTIONS} captions per image; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} (a shared machine makes every timing noisy)",
        flush=True,
    )
    header = f"{'images x captions':>18s} {'matmul s':>9s} {'ours s':>8s} {'ours/mm':>8s} {'best/best':>9s} {'today s':>9s} {'today/mm':>9s}"
    results = []
    for num_images in sizes:
        result = run_size(num_images, dim, args.repeats, args.todays_budget, args.skip_todays, args.rerank_k)
        results.append(result)
        n, m, _ = result["size"]
        todays = (
            f"{result['todays']:9.1f} {result['todays_ratio']:8.0f}x"
            + ("" if result["todays_rows"] == n else f"  (extrapolated from {result['todays_rows']} rows)")
            if "todays" in result
            else f"{'-':>9s} {'-':>9s}"
        )
        if len(results) == 1:
            print(header)
        print(
            f"{n:>7d} x {m:<8d} {result['matmul']:9.3f} {result['ours']:8.2f} {result['ratio']:7.1f}x "
            f"{result['best_ratio']:8.1f}x {todays}",
            flush=True,
        )
    print("\nruns (seconds, interleaved):")
    for result in results:
        print(f"  {result['size'][0]} images: matmul {', '.join(f'{t:.3f}' for t in result['matmul_runs'])}; "
              f"ours {', '.join(f'{t:.2f}' for t in result['ours_runs'])}")  # fmt: skip
    if not args.skip_todays:
        print("\nagreement with today's path (rows it scored):")
        for result in results:
            print(
                f"  {result['size'][0]} images: max |diff| {result['max_abs_diff']:.2e} (relative {result['max_rel_diff']:.1e}); "
                f"identical top 10 in {100 * result['top10_same']:.1f} % of {result['todays_rows']} rows; whole ranking "
                f"identical in {result['full_order_same_rows']}/{result['full_order_rows']} rows; i2t R@1/5/10 "
                f"ours {'/'.join(f'{v:.2f}' for v in result['recall_ours'].values())}, "
                f"today's {'/'.join(f'{v:.2f}' for v in result['recall_todays'].values())}"
            )
    if args.rerank_k:
        print("\ntop-K re-ranking (rank by -CSD, re-score the top K by the sampled log p) vs the exact ranking, all rows:")
        for result in results:
            exact = "/".join(f"{v:.2f}" for v in result["recall_exact"].values())
            for row in result["rerank"]:
                print(
                    f"  {result['size'][0]} images, K = {row['top_k']:4d}: {row['seconds']:7.2f} s = {row['ratio']:5.1f}x "
                    f"the matmul; identical top 1 in {100 * row['top1_same']:.1f} %, top 10 in "
                    f"{100 * row['top10_same']:.1f} % of the rows; i2t R@1/5/10 "
                    f"{'/'.join(f'{v:.2f}' for v in row['recall'].values())} (exact {exact})"
                )
    largest = results[-1]
    print(
        f"\ntarget: <= 60x the bare matmul at 5000 x 25000, J = 7, D = 1024 (floor ~49x, the J x J products); "
        f"measured here at {largest['size'][0]} x {largest['size'][1]}, D = {largest['size'][2]}: "
        f"{largest['ratio']:.1f}x (median of ratios), {largest['best_ratio']:.1f}x (best/best)"
    )


if __name__ == "__main__":
    main()
