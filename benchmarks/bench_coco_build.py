"""COCO-sized build: time and peak memory of ``load_coco`` on synthetic official-format files.

Writes a synthetic COCO 2014 tree at the real scale (120k images, 600k+ captions, ~860k instance
annotations with segmentation polygons, Karpathy split with 5k val / 5k test images) and measures,
each in a fresh process so peak memory is that step's alone:

- naive: ``json.load`` of the five annotation files (what a straightforward loader does first);
- build: ``load_coco`` from scratch: streamed JSON, numpy indices, Arrow written in batches;
- reload: ``load_coco`` again (the Arrow cache is memory-mapped, nothing is parsed);
- view: the evaluation view of the test split (``make_retrieval_split``).

Memory: peak RSS (VmHWM) and peak anonymous memory (RssAnon, sampled), each minus that of a
process that only imports ``hf_pcme.data`` (torch and transformers come with it). RSS also counts
the pages of the memory-mapped Arrow files, which are file-backed and reclaimable; anonymous memory
is what the step allocates. The build runs at two scales: the naive parse grows by kilobytes per
caption, ours only by its compact numpy index (tens of bytes per caption).

Images: every image path is a hard link to one tiny JPEG, so the existence checks run for real
(``missing_images="error"``) without writing 120k files' worth of blocks.

    python benchmarks/bench_coco_build.py            # 120k images (~5 minutes, ~1 GB of disk)
    python benchmarks/bench_coco_build.py --quick    # 6k images
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CATEGORY_IDS = (
    list(range(1, 12)) + list(range(13, 26)) + [27, 28] + list(range(31, 45)) + list(range(46, 66))
    + [67, 70] + list(range(72, 83)) + list(range(84, 91))
)
NOUNS = ("man", "woman", "dog", "cat", "giraffe", "bus", "plate", "kite", "surfer", "train", "pizza", "horse")
PLACES = ("street", "beach", "kitchen", "field", "table", "park", "station", "room")


def write_synthetic_coco(root: Path, num_images: int, seed: int = 0) -> dict[str, int]:
    """Official-format annotation files for ``num_images`` images; returns counts."""
    rng = random.Random(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    num_val2014 = max(int(num_images * 0.31), 2 * min(5000, num_images // 10) + 1)
    eval_size = min(5000, num_images // 10)
    jpeg = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (8, 8), (120, 30, 200)).save(jpeg, format="JPEG")
    categories = [{"supercategory": "thing", "id": c, "name": f"category {c}"} for c in CATEGORY_IDS]
    polygon = [[round(rng.uniform(0, 640), 2) for _ in range(24)]]
    karpathy, sentence_id, caption_id, instance_id = [], 0, 0, 0
    counts = {"images": num_images, "coco_captions": 0, "karpathy_captions": 0, "instances": 0}
    for part, ids in (("train", range(1, num_images - num_val2014 + 1)),
                      ("val", range(num_images - num_val2014 + 1, num_images + 1))):
        folder = root / f"{part}2014"
        folder.mkdir(exist_ok=True)
        images, captions, instances = [], [], []
        for position, image_id in enumerate(ids):
            file_name = f"COCO_{part}2014_{image_id:012d}.jpg"
            source = root / f"tiny_{image_id // 50_000}.jpg"  # file systems cap links per inode (ext4: 65,000)
            if not source.exists():
                source.write_bytes(jpeg.getvalue())
            os.link(source, folder / file_name)
            images.append({"license": 3, "file_name": file_name, "coco_url": "http://x", "height": 480,
                           "width": 640, "date_captured": "2013-11-14 16:28:13", "flickr_url": "http://y",
                           "id": image_id})
            texts = [f"a {rng.choice(NOUNS)} number {image_id} seen in the {rng.choice(PLACES)} {k}"
                     for k in range(6 if image_id % 97 == 0 else 5)]
            sentences = []
            for k, text in enumerate(texts):
                caption_id += 1
                captions.append({"image_id": image_id, "id": caption_id, "caption": text})
                if k < 5:  # the Karpathy split keeps five
                    sentences.append({"tokens": text.split(), "raw": text + " ", "imgid": image_id,
                                      "sentid": sentence_id})
                    sentence_id += 1
            for _ in range(rng.randrange(0, 15)):
                instance_id += 1
                instances.append({"segmentation": polygon, "area": 1234.5, "iscrowd": 0, "image_id": image_id,
                                  "bbox": [1.0, 2.0, 30.0, 40.0], "category_id": rng.choice(CATEGORY_IDS),
                                  "id": instance_id})
            if part == "val":
                split = "val" if position < eval_size else "test" if position < 2 * eval_size else "restval"
            else:
                split = "train"
            karpathy.append({"filepath": f"{part}2014", "sentids": [s["sentid"] for s in sentences],
                             "filename": file_name, "imgid": len(karpathy), "split": split,
                             "sentences": sentences, "cocoid": image_id})
        info = {"description": "synthetic", "version": "1.0"}
        with open(root / "annotations" / f"captions_{part}2014.json", "w") as handle:
            json.dump({"info": info, "images": images, "licenses": [], "annotations": captions}, handle)
        with open(root / "annotations" / f"instances_{part}2014.json", "w") as handle:
            json.dump({"info": info, "images": images, "licenses": [], "annotations": instances,
                       "categories": categories}, handle)
        counts["coco_captions"] += len(captions)
        counts["instances"] += len(instances)
    with open(root / "dataset_coco.json", "w") as handle:
        json.dump({"images": karpathy, "dataset": "coco"}, handle)
    counts["karpathy_captions"] = sentence_id
    return counts


def _memory_status() -> dict[str, int]:
    """VmHWM (peak RSS of this process image), RssAnon and RssFile from /proc/self/status, in KiB."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                values[key] = int(value.split()[0])
    return values


def child(mode: str, root: str, cache: str) -> None:
    """One measured step in this (fresh) process; prints 'seconds peak_rss_kib peak_anon_kib' last.

    Peak RSS is VmHWM, not ``ru_maxrss``: after fork + exec, Linux carries the parent's RSS at fork
    time into the child's ``ru_maxrss``. RSS also counts the pages of memory-mapped Arrow files
    (file-backed, reclaimable), so the peak of anonymous memory (RssAnon, sampled every 10 ms) is
    reported too: that is the memory the step itself allocates.
    """
    import threading

    import hf_pcme.data  # noqa: F401 - the import baseline is part of every child

    peak_anon = [_memory_status()["RssAnon"]]

    def sample() -> None:
        while True:
            peak_anon[0] = max(peak_anon[0], _memory_status()["RssAnon"])
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    if mode == "naive":
        loaded = [json.load(open(path)) for path in sorted(Path(root, "annotations").glob("*.json"))]
        loaded.append(json.load(open(Path(root, "dataset_coco.json"))))
    elif mode in ("build", "reload"):
        from hf_pcme.data import load_coco

        coco = load_coco(root, cache_dir=cache)
        assert len(coco["test"]) > 0
    elif mode == "view":
        from hf_pcme.data import load_coco, make_retrieval_split

        view = make_retrieval_split(load_coco(root, cache_dir=cache, split="test"))
        assert view.image_labels.shape[1] == 80
    elapsed = time.perf_counter() - start
    time.sleep(0.05)
    status = _memory_status()
    print(f"{elapsed:.3f} {status['VmHWM']} {max(peak_anon[0], status['RssAnon'])}")


def measure(mode: str, root: Path, cache: Path) -> tuple[float, float, float]:
    """(seconds, peak RSS MiB, peak anonymous memory MiB) of ``mode`` in a fresh interpreter."""
    env = dict(os.environ, HF_DATASETS_DISABLE_PROGRESS_BARS="1", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(root), str(cache)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    seconds, peak_kib, anon_kib = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(peak_kib) / 1024, int(anon_kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6k images instead of 120k")
    parser.add_argument("--num-images", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "ROOT", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    full = args.num_images or (6_000 if args.quick else 120_000)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_coco_"))
    try:
        _, baseline, baseline_anon = measure("import", workdir, workdir)
        print(f"import baseline (python + hf_pcme.data, torch, transformers): peak RSS {baseline:.0f} MiB, "
              f"anonymous {baseline_anon:.0f} MiB; the tables show increments above these")
        rows = []
        for num_images in (full // 4, full):
            root, cache = workdir / f"coco_{num_images}", workdir / f"cache_{num_images}"
            start = time.perf_counter()
            counts = write_synthetic_coco(root, num_images)
            sizes = sum(p.stat().st_size for p in [*root.glob("annotations/*.json"), root / "dataset_coco.json"])
            print(f"\n{num_images:,} images: wrote {counts['coco_captions']:,} COCO captions "
                  f"({counts['karpathy_captions']:,} in the Karpathy split), {counts['instances']:,} instances, "
                  f"{sizes / 2**20:,.0f} MiB of JSON in {time.perf_counter() - start:.1f} s")
            results = {mode: measure(mode, root, cache) for mode in ("naive", "build", "reload", "view")}
            arrow = sum(p.stat().st_size for p in cache.rglob("*.arrow")) / 2**20
            print(f"| step ({num_images:,} images) | seconds | peak RSS (MiB) | peak anonymous memory (MiB) |")
            print("|---|---|---|---|")
            for mode, label in (("naive", "naive json.load of the 5 files"), ("build", "load_coco, first build"),
                                ("reload", "load_coco, second load (Arrow cache)"),
                                ("view", "eval view of the test split")):
                seconds, peak, anon = results[mode]
                print(f"| {label} | {seconds:.2f} | {peak - baseline:,.0f} | {anon - baseline_anon:,.0f} |")
            (build_s, build_mb, build_anon), (naive_s, naive_mb, naive_anon) = results["build"], results["naive"]
            reload_s = results["reload"][0]
            print(f"Arrow cache: {arrow:,.0f} MiB (memory-mapped: in RSS once touched, not in anonymous memory)")
            print(f"ratios: build / naive peak anonymous memory = "
                  f"{(build_anon - baseline_anon) / max(naive_anon - baseline_anon, 1):.3f}; "
                  f"build / naive peak RSS = {(build_mb - baseline) / max(naive_mb - baseline, 1):.3f}; "
                  f"second load / first build time = {reload_s / build_s:.4f}; "
                  f"build time / naive parse time = {build_s / naive_s:.2f}")
            rows.append((num_images, counts["karpathy_captions"], build_anon - baseline_anon,
                         naive_anon - baseline_anon))
            shutil.rmtree(root)
            shutil.rmtree(cache)
        (small, small_captions, small_build, small_naive), (big, big_captions, big_build, big_naive) = rows
        extra = big_captions - small_captions
        print(f"\nscaling {small:,} -> {big:,} images, peak anonymous memory: build {small_build:,.0f} -> "
              f"{big_build:,.0f} MiB ({(big_build - small_build) / extra * 2**20:,.0f} bytes per extra caption); "
              f"naive {small_naive:,.0f} -> {big_naive:,.0f} MiB "
              f"({(big_naive - small_naive) / extra * 2**20:,.0f} bytes per extra caption)")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
