"""Webly supervised two-stage training vs clean captions only, at the same clean-data budget.

Both arms run ``configs/shapes_webly.yaml``: the two-stage arm as it is (stage 1 on noisy-tagged
web images, then stage 2 on the small clean caption set); the clean-only arm with stage 1 set to
0 steps, so it sees exactly the same clean images, captions, steps and schedule in stage 2, and
starts from the same initial weights (same seed, same vocabulary, built from both stages' texts).
Each arm is trained with seeds 0, 1, 2 (model initialisation and sampling; the data are fixed) and
evaluated on the shapes **test** split (500 images, 2,500 captions, never seen in training).
Prints every run, the mean over seeds, and the difference two-stage minus clean-only with its
sign, whatever it is.

Sizes (default ``--size small``, about 2 minutes on the shared 2-core CPU): 32-pixel
images, batch 32; stage 1 on 1,000 web images for 2 epochs (62 steps), stage 2 on 100 clean
images x 5 captions for 6 epochs (90 steps); test on 200 images / 1,000 captions.
``--size recipe`` uses the sizes of ``configs/shapes_webly.yaml`` (4,000 web / 400 clean images,
64 pixels, batch 64; the full 500-image test split).

    python benchmarks/bench_webly.py                  # small sizes
    python benchmarks/bench_webly.py --size recipe    # the recipe's sizes (about 12 minutes)
    python benchmarks/bench_webly.py --quick          # tiny sizes: checks that it runs, numbers mean nothing
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shapes_webly.yaml"
METRICS = ("rsum", "i2t_R@1", "t2i_R@1", "i2t_pmrp", "t2i_pmrp")


def small_sizes(cache: Path) -> list[str]:
    return [
        f"data.options={{num_images: 100, num_eval_images: 200, seed: 0, image_size: 32, cache_dir: {cache}}}",
        f"stages.0.data.options={{num_images: 1000, seed: 1, image_size: 32, tag_drop_rate: 0.2, tag_swap_rate: 0.2, "
        f"tag_spurious_rate: 0.3, cache_dir: {cache}}}",
        "data.image_size=32", "train.batch_size=32", "train.warmup_steps=20", "stages.0.epochs=2", "stages.1.epochs=6",
    ]


def arm_overrides(arm: str, seed: int, out: Path, cache: Path, size: str, extra: list[str]) -> list[str]:
    overrides = [f"seed={seed}", f"output_dir={out}", "eval.enabled=false", "train.checkpoint_every=100000",
                 "train.log_every=100000", "logging=jsonl"]
    if size == "small":
        overrides += small_sizes(cache)
    elif size == "quick":
        overrides += [
            f"data.options={{num_images: 16, num_eval_images: 8, seed: 0, image_size: 64, cache_dir: {cache}}}",
            f"stages.0.data.options={{num_images: 64, seed: 1, image_size: 64, cache_dir: {cache}}}",
            "stages.0.steps=4", "stages.1.steps=4", "train.batch_size=16", "train.warmup_steps=2",
        ]
    else:
        import yaml

        recipe = yaml.safe_load(CONFIG.read_text())
        clean = {**recipe["data"]["options"], "cache_dir": str(cache)}
        web = {**recipe["stages"][0]["data"]["options"], "cache_dir": str(cache)}
        overrides += [f"data.options={clean}", f"stages.0.data.options={web}"]
    # After the sizes: "steps" wins over "epochs", so the clean-only arm skips stage 1 whatever its epochs.
    if arm == "clean-only":
        overrides += ["stages.0.steps=0"]
    return overrides + extra


def run_arm(arm: str, seed: int, root: Path, cache: Path, size: str, extra: list[str]) -> tuple[dict, float]:
    from accelerate import Accelerator

    from hf_pcme.data import load_dataset_by_name
    from hf_pcme.training.config import load_recipe
    from hf_pcme.training.evaluation import evaluate_model
    from hf_pcme.training.trainer import train

    recipe = load_recipe(CONFIG, arm_overrides(arm, seed, root / f"{arm}-{seed}", cache, size, extra))
    started = time.perf_counter()
    result = train(recipe)
    elapsed = time.perf_counter() - started
    test = load_dataset_by_name(recipe.data.name, **recipe.data.options, split="test")
    metrics = evaluate_model(result.model, result.processor, test, recipe, Accelerator(cpu=True))
    return metrics, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("small", "recipe"), default="small", help="see the module docstring")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for both arms (key=value)")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    # One thread: with these tiny models, a second one mostly waits at OpenMP barriers on a busy machine.
    torch.set_num_threads(args.threads)
    arms = ("clean-only", "two-stage")
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for seed in args.seeds:
            for arm in arms:  # interleaved: machine drift hits both arms alike
                size = "quick" if args.quick else args.size
                metrics, elapsed = run_arm(arm, seed, root, root / "cache", size, args.overrides)
                results[arm].append(metrics)
                shown = "  ".join(f"{key} {metrics[key]:6.2f}" for key in METRICS)
                print(f"seed {seed}  {arm:<10}  {shown}  ({elapsed:.0f} s)", flush=True)
    print(f"\nshapes test split ({'quick' if args.quick else args.size} sizes), mean of {len(args.seeds)} seeds "
          "(percent; RSUM out of 600)")
    print(f"{'':<24}" + "".join(f"{key:>10}" for key in METRICS))
    means = {arm: {key: statistics.mean(m[key] for m in results[arm]) for key in METRICS} for arm in arms}
    for arm in arms:
        print(f"{arm:<24}" + "".join(f"{means[arm][key]:10.2f}" for key in METRICS))
    print(f"{'two-stage - clean-only':<24}" + "".join(f"{means['two-stage'][k] - means['clean-only'][k]:+10.2f}"
                                                     for k in METRICS))
    per_seed = [b["rsum"] - a["rsum"] for a, b in zip(results["clean-only"], results["two-stage"])]
    print("RSUM difference per seed: " + ", ".join(f"{d:+.2f}" for d in per_seed))


if __name__ == "__main__":
    main()
