"""Benchmark: every retrieval metric vs the bare score matmul, one product vs two passes, at 3 sizes.

Data: N images x 5N captions, D = 1024, random embeddings with log variances and random 80-d
multi-hot labels (COCO-like: one "person" category in 45 % of the images, 79 others at 3 %, so
~2.8 labels per image and PMRP's R is in the hundreds/thousands). N = 1,000, 2,500 and 5,000
(COCO 5K: 5,000 x 25,000). All metrics: Recall@{1,5,10} 1K + 5K, PMRP for zeta 0/1/2 (1K + 5K),
R-Precision, MAP@R, both directions, via ``evaluate_retrieval(..., protocol="coco")``.

Per size and scorer, in a fresh subprocess (so memory is measured honestly): the compiled ranking
kernel is loaded first (compiled, ~9 s, on the first run in a fresh environment), then
``--repeats`` rounds, each timing, in an order that rotates from round to round:

- ``matmul``: ``image_embeds @ text_embeds.T`` (torch's threads), the reference;
- ``default``: ``evaluate_retrieval`` with the default ``max_memory`` (1 GiB): one product when
  the matrix fits (it does up to ~7,300 x 36,600 scores), two passes past it;
- ``two passes``: ``evaluate_retrieval(max_memory=0)``, the matrix computed once per direction.

Printed: each round's ratio (time / that round's matmul), the median of the ratios, the path the
default took, the extra peak memory of each side (VmHWM during the call - VmRSS before it, inputs
excluded), and whether both paths gave identical metrics. Timings on a shared machine swing a lot
(hence the interleaving and the medians of ratios); rerun on a quiet machine with

    OMP_NUM_THREADS=2 python benchmarks/bench_metrics.py            # ~5-10 minutes on 2 cores
    python benchmarks/bench_metrics.py --quick                      # N = 200, 500, 1,000; D = 256
    python benchmarks/bench_metrics.py --references                 # + sampled scorer, naive sort

Targets (issue 20): all metrics at COCO 5K <= 1.6x the matmul, extra peak memory <= 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SIZES = {"full": ((1000, 2500, 5000), 5, 1024), "quick": ((200, 500, 1000), 5, 256)}
SIDES = ("matmul", "default", "two passes")


def _status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def make_inputs(num_images: int, captions: int, dim: int, seed: int = 0):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    num_texts = num_images * captions
    inputs = {
        "image_embeds": F.normalize(torch.randn(num_images, dim, generator=g), dim=-1),
        "text_embeds": F.normalize(torch.randn(num_texts, dim, generator=g), dim=-1),
        "image_log_sigma2": torch.randn(num_images, dim, generator=g) * 0.5 - 7.0,
        "text_log_sigma2": torch.randn(num_texts, dim, generator=g) * 0.5 - 7.0,
    }
    rates = torch.full((80,), 0.03)
    rates[0] = 0.45
    labels = (torch.rand(num_images, 80, generator=g) < rates).float()
    text_to_image = torch.arange(num_images).repeat_interleave(captions)
    return inputs, labels, text_to_image


def _time_matmul(inputs) -> float:
    start = time.perf_counter()
    scores = inputs["image_embeds"] @ inputs["text_embeds"].t()
    elapsed = time.perf_counter() - start
    del scores
    return elapsed


def run_size(num_images: int, captions: int, dim: int, scorer: str, repeats: int) -> dict:
    """One size and scorer (runs in its own process): interleaved rounds of the three sides."""
    from hf_pcme.metrics import evaluate_retrieval
    from hf_pcme.metrics.retrieval import score_source
    from hf_pcme.metrics.schedule import score_path

    inputs, labels, text_to_image = make_inputs(num_images, captions, dim)
    start = time.perf_counter()
    tiny, tiny_labels, tiny_text_to_image = make_inputs(20, captions, 8)
    evaluate_retrieval(**tiny, scorer=scorer, text_to_image=tiny_text_to_image, image_labels=tiny_labels)
    warm_up = time.perf_counter() - start
    common = {**inputs, "scorer": scorer, "text_to_image": text_to_image, "image_labels": labels,
              "protocol": "coco", "fold_size": 1000 if num_images % 1000 == 0 else num_images // 5}  # fmt: skip
    calls = {"matmul": lambda: _time_matmul(inputs), "default": lambda: evaluate_retrieval(**common),
             "two passes": lambda: evaluate_retrieval(**common, max_memory=0)}  # fmt: skip
    times = {side: [] for side in SIDES}
    peaks = {side: 0 for side in SIDES}
    results = {}
    for round_index in range(repeats):
        order = SIDES[round_index % 3 :] + SIDES[: round_index % 3]
        for side in order:
            _reset_peak()
            baseline = _status("VmRSS")
            start = time.perf_counter()
            value = calls[side]()
            times[side].append(time.perf_counter() - start)
            peaks[side] = max(peaks[side], _status("VmHWM") - baseline)
            if side != "matmul":
                results[side] = value
    ratios = {side: [t / m for t, m in zip(times[side], times["matmul"])] for side in SIDES[1:]}
    return {
        "num_images": num_images, "num_texts": num_images * captions, "dim": dim, "scorer": scorer,
        "path": score_path(score_source(None, scorer, inputs["image_embeds"], inputs["text_embeds"],
                                        inputs["image_log_sigma2"], inputs["text_log_sigma2"],
                                        None, None, 7, None, None, 0), 1 << 30),
        "times": times, "ratios": ratios, "median_ratio": {side: statistics.median(r) for side, r in ratios.items()},
        "extra_peak_bytes": peaks, "identical": results["default"] == results["two passes"],
        "warm_up": warm_up, "num_metrics": len(results["default"]),
        "metrics": {k: results["default"][k] for k in ("i2t_R@1", "1k/t2i_R@10", "i2t_pmrp", "t2i_map_at_r")},
    }  # fmt: skip


def run_sampled_slice(size: str, full: bool) -> dict:
    """The sampled scorer (J = 7): time its score blocks on a slice of rows and extrapolate."""
    import torch

    from hf_pcme.metrics import build_scorer, evaluate_retrieval

    num_images, captions, dim, fold_size = _largest(size)
    inputs, labels, text_to_image = make_inputs(num_images, captions, dim)
    matmul = _time_matmul(inputs)
    kwargs = {"num_samples": 7, "negative_scale": 15.0, "shift": 15.0}
    start = time.perf_counter()
    scorer = build_scorer("sampled", **inputs, **kwargs)
    draw = time.perf_counter() - start
    if full:
        start = time.perf_counter()
        evaluate_retrieval(
            **inputs, scorer="sampled", text_to_image=text_to_image, image_labels=labels,
            protocol="coco", fold_size=fold_size, **kwargs,
        )  # fmt: skip
        return {"seconds": time.perf_counter() - start, "matmul": matmul, "extrapolated": False}
    image_rows, text_rows = max(1, num_images // 80), max(1, num_images * captions // 80)
    with torch.no_grad():
        start = time.perf_counter()
        scorer.image_rows(slice(0, image_rows))
        i2t = (time.perf_counter() - start) * num_images / image_rows
        start = time.perf_counter()
        scorer.text_rows(slice(0, text_rows))
        t2i = (time.perf_counter() - start) * num_images * captions / text_rows
    return {"seconds": draw + i2t + t2i, "matmul": matmul, "extrapolated": True, "scoring_only": True}


def run_naive_slice(size: str) -> dict:
    """Naive reference: score rows, then fully sort every row, both directions (slice, extrapolated)."""
    import torch

    num_images, captions, dim, _ = _largest(size)
    inputs, _, _ = make_inputs(num_images, captions, dim)
    images, texts = inputs["image_embeds"], inputs["text_embeds"]
    image_rows, text_rows = num_images // 10, num_images * captions // 10
    start = time.perf_counter()
    torch.sort(images[:image_rows] @ texts.t(), dim=1, descending=True)
    torch.sort(texts[:text_rows] @ images.t(), dim=1, descending=True)
    return {"seconds": (time.perf_counter() - start) * 10, "matmul": _time_matmul(inputs)}


def _largest(size: str) -> tuple[int, int, int, int]:
    images, captions, dim = SIZES[size]
    return images[-1], captions, dim, 1000 if images[-1] % 1000 == 0 else images[-1] // 5


def _subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark step {args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print_size(row: dict) -> None:
    name = f"{row['num_images']} x {row['num_texts']}, D={row['dim']}, {row['scorer']}"
    print(f"\n{name}: default path = {row['path']}; both paths identical: {'yes' if row['identical'] else 'NO'}; "
          f"{row['num_metrics']} values; kernel load before timing {row['warm_up']:.1f} s")  # fmt: skip
    print(f"  matmul seconds: {', '.join(f'{t:.2f}' for t in row['times']['matmul'])}")
    for side in SIDES[1:]:
        ratios = ", ".join(f"{r:.2f}" for r in row["ratios"][side])
        print(f"  {side:10s} ratios {ratios}  median {row['median_ratio'][side]:.2f}x  "
              f"extra peak {row['extra_peak_bytes'][side] / 2**20:.0f} MiB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 200, 500, 1,000 images, D = 256")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per size (default 5)")
    parser.add_argument("--scorers", default="cosine,csd", help="comma-separated scorers (default cosine,csd)")
    parser.add_argument("--references", action="store_true", help="also the sampled scorer and a naive full sort")
    parser.add_argument("--sampled-full", action="store_true", help="run the sampled scorer in full (slow)")
    parser.add_argument("--_step", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = "quick" if args.quick else "full"
    if args._step:
        kind = args._step[0]
        if kind == "size":
            num_images, captions, dim, scorer, repeats = args._step[1:]
            result = run_size(int(num_images), int(captions), int(dim), scorer, int(repeats))
        elif kind == "sampled":
            result = run_sampled_slice(args._step[1], args._step[2] == "full")
        else:
            result = run_naive_slice(args._step[1])
        print(json.dumps(result))
        return

    import torch

    images, captions, dim = SIZES[size]
    print(
        f"bench_metrics: N x 5N scores for N in {images}, D = {dim}, {args.repeats} interleaved rounds; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} (a shared machine makes every timing noisy)"
    )
    rows = []
    for scorer in args.scorers.split(","):
        for num_images in images:
            row = _subprocess(["--_step", "size", str(num_images), str(captions), str(dim), scorer, str(args.repeats)])
            _print_size(row)
            rows.append(row)
    print("\ntarget (issue 20): all metrics at COCO 5K <= 1.6x the matmul, extra peak memory <= 1024 MiB")
    for row in rows if not args.quick else []:
        if row["num_images"] != images[-1]:
            continue
        ratio, peak = row["median_ratio"]["default"], row["extra_peak_bytes"]["default"]
        print(f"  {row['scorer']:7s} {ratio:.2f}x {'OK' if ratio <= 1.6 else 'MISSED'}, "
              f"{peak / 2**20:.0f} MiB {'OK' if peak <= 2**30 else 'MISSED'} ({row['path']})")  # fmt: skip
    if args.quick:
        print("  (--quick is a smoke run: at these sizes the matmul is too small for the target to apply)")
    if args.references:
        _print_references(size, args.sampled_full, rows)


def _print_references(size: str, sampled_full: bool, rows: list[dict]) -> None:
    sampled = _subprocess(["--_step", "sampled", size, "full" if sampled_full else "slice"])
    naive = _subprocess(["--_step", "naive", size])
    label = "sampled scorer J=7, " + ("scoring only, extrapolated" if sampled.get("extrapolated") else "all metrics")
    print(f"\n{label}: {sampled['seconds']:.2f} s = {sampled['seconds'] / sampled['matmul']:.1f}x the matmul")
    print(f"naive, full sort of every row, both directions (extrapolated): {naive['seconds']:.2f} s = "
          f"{naive['seconds'] / naive['matmul']:.2f}x the matmul")  # fmt: skip


if __name__ == "__main__":
    main()
