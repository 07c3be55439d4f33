"""Check protocol="eccv_caption" against the eccv_caption package on the full COCO 5K test ids.

    python scripts/check_eccv_caption_5k.py [--seed 0] [--signal 3]

Scores = N(0, 1) noise + ``--signal`` on the COCO pairs (so the numbers are far from 0 and 100),
5,000 images x 25,000 captions (the package's own test ids); our chunked ranking vs
the package's ``Metrics`` on the same scores (its ranked lists cut to the top 64, more than any
query's number of ECCV positives, 48, so its numbers are unchanged). Prints both and the largest
difference. The metric README quotes the output.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from hf_pcme.metrics import evaluate_retrieval
from hf_pcme.metrics.eccv_caption import find_annotation_dir, load_positives

TOP = 64


def top_ids(scores: np.ndarray, ids: np.ndarray) -> dict[int, list[int]]:
    part = np.argpartition(-scores, TOP, axis=1)[:, :TOP]
    order = np.take_along_axis(part, np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable"), 1)
    return ids[order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signal", type=float, default=3.0, help="added to the scores of the COCO pairs")
    args = parser.parse_args()
    import eccv_caption

    text_ids = np.load(find_annotation_dir() / "coco_test_ids.npy").astype(np.int64)
    caption_image = load_positives("original")["t2i"]
    image_ids = np.array(list(dict.fromkeys(caption_image[int(t)][0] for t in text_ids)), dtype=np.int64)
    row = {int(i): r for r, i in enumerate(image_ids)}
    text_to_image = np.array([row[caption_image[int(t)][0]] for t in text_ids])
    scores = np.random.default_rng(args.seed).standard_normal((len(image_ids), len(text_ids)), dtype=np.float32)
    scores[text_to_image, np.arange(len(text_ids))] += np.float32(args.signal)

    start = time.perf_counter()
    ours = evaluate_retrieval(scores=scores, text_to_image=text_to_image, image_ids=image_ids, text_ids=text_ids,
                              protocol="eccv_caption")
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    i2t_top, t2i_top = top_ids(scores, text_ids), top_ids(scores.T.copy(), image_ids)
    retrieved = {"i2t": {int(i): i2t_top[r].tolist() for r, i in enumerate(image_ids)},
                 "t2i": {int(t): t2i_top[c].tolist() for c, t in enumerate(text_ids)}}
    metrics = eccv_caption.Metrics()
    eccv = metrics.eccv_metrics(retrieved, "all")
    theirs = {}
    for d in ("i2t", "t2i"):
        theirs[f"eccv_{d}_map@r"] = 100 * eccv["eccv_map_at_r"][d]
        theirs[f"eccv_{d}_rp"] = 100 * eccv["eccv_rprecision"][d]
        theirs[f"eccv_{d}_r@1"] = 100 * eccv["eccv_r1"][d]
        for k in (1, 5, 10):
            theirs[f"cxc_{d}_r@{k}"] = 100 * metrics.cxc_recalls(retrieved, "all", K=k)[d]
            theirs[f"{d}_R@{k}"] = 100 * metrics.coco_5k_recalls(retrieved, "all", K=k)[d]
    theirs_seconds = time.perf_counter() - start
    table = {key: (ours[key], value, abs(ours[key] - value)) for key, value in theirs.items()}
    print(json.dumps({key: [f"{a:.6f}", f"{b:.6f}"] for key, (a, b, _) in table.items()}, indent=1))
    print(f"largest |ours - eccv_caption| over {len(table)} values: {max(d for *_, d in table.values()):.3g} "
          f"(percent points); ours {ours_seconds:.1f} s (3 passes), eccv_caption {theirs_seconds:.1f} s "
          "(on lists cut to the top 64)")


if __name__ == "__main__":
    main()
