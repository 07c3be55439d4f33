"""Two-stage retrieval on the shapes test split: the dual encoder alone vs + IMRAM re-ranking of its top-K.

Quality: R@1/5/10 and PMRP in both directions on the shapes test split (500 images, 2,500 captions),
ranked by the dual encoder (PCME, its own score) and by the dual encoder with each query's top-K
re-ranked (items beyond K keep the first-stage order), one row per re-ranker seed and the mean over
seeds: ordered by IMRAM's score alone, and by the fusion of both stages' scores with the weight
``config.fusion_weight`` that scripts/choose_fusion_weight.py chose on the validation split. The
dual encoder is the one configs/shapes_pcme.yaml trains; the re-rankers are configs/shapes_imram.yaml
with seeds 0, 1, 2 (IMRAM's projections, memory units and a copy of the text tower; the vision tower
is the dual encoder's, frozen).

Cost: per caption query over the 500 test images (a gallery whose image features are already
computed), (a) the two-stage search: embed the caption with the dual encoder, search the index,
encode its words for IMRAM and score the top-K images; vs (b) IMRAM alone: encode its words and
score all 500 images. Measured for a batch of queries (``--query-batch``, throughput: fixed per-call
costs are shared) and for one query at a time (latency: the towers' and the ops' fixed costs weigh
more). The two sides alternate round by round (the machine drifts); the printed ratio is the median
of the per-round ratios a / b.

    python scripts/train.py --config configs/shapes_pcme.yaml           # the dual encoder (runs/shapes_pcme)
    for s in 0 1 2; do python scripts/train.py --config configs/shapes_imram.yaml seed=$s output_dir=runs/shapes_imram_s$s
      python scripts/choose_fusion_weight.py --dual-encoder runs/shapes_pcme --reranker runs/shapes_imram_s$s; done
    python benchmarks/bench_rerank.py                                   # or --train to train what is missing
    python benchmarks/bench_rerank.py --quick                           # fewer timed queries, first re-ranker only
"""

from __future__ import annotations

import argparse
import runpy
import statistics
import time
from pathlib import Path

import torch
from accelerate import Accelerator

import hf_pcme  # noqa: F401  (registers the models)
from hf_pcme import IMRAMModel, PCMEModel, PCMEProcessor
from hf_pcme.data import load_dataset_by_name, make_retrieval_split
from hf_pcme.index import CrossModalIndex, default_metric
from hf_pcme.rerank import candidate_scores, fuse_scores
from hf_pcme.training.config import load_recipe
from hf_pcme.training.evaluation import default_scorer, encode_for_scorer
from hf_pcme.rerank_evaluation import (
    encode_local_features,
    first_stage_scores,
    metrics_from_matrices,
    reranked_matrices,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_pmrp", "t2i_pmrp", "rsum")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dual-encoder", default="runs/shapes_pcme")
    parser.add_argument("--rerankers", nargs="+", default=[f"runs/shapes_imram_s{seed}" for seed in range(3)])
    parser.add_argument("--rerank-top-k", type=int, default=50)
    parser.add_argument("--query-batch", type=int, default=100, help="caption queries per timed call (throughput)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per side (alternating)")
    parser.add_argument("--single-queries", type=int, default=40, help="queries timed one at a time (latency)")
    parser.add_argument("--train", action="store_true", help="train the missing dual encoder / re-rankers first")
    parser.add_argument("--quick", action="store_true", help="first re-ranker only, fewer timed rounds")
    return parser.parse_args()


def train_missing(args: argparse.Namespace) -> None:
    from hf_pcme.training import train

    if not (Path(args.dual_encoder) / "config.json").exists():
        train(load_recipe(REPO_ROOT / "configs/shapes_pcme.yaml", [f"output_dir={args.dual_encoder}"]))
    for seed, folder in enumerate(args.rerankers):
        if not (Path(folder) / "config.json").exists():
            overrides = [f"seed={seed}", f"output_dir={folder}", f"model.pretrained={args.dual_encoder}"]
            train(load_recipe(REPO_ROOT / "configs/shapes_imram.yaml", overrides))
        if not (Path(folder) / "fusion_weight_selection.json").exists():  # choose the fusion weight on val
            choose = runpy.run_path(str(REPO_ROOT / "scripts/choose_fusion_weight.py"))
            choose["main"](["--dual-encoder", args.dual_encoder, "--reranker", folder, "--split", "val"])


def row(name: str, metrics: dict[str, float]) -> str:
    return f"{name:<28}" + "".join(f"{metrics[key]:>9.2f}" for key in KEYS)


@torch.no_grad()
def time_ratios(model, reranker, processor, captions, image_locals, index, top_k: int, rounds: int) -> list[float]:
    """Ratios (two-stage time) / (IMRAM over the whole gallery time) for the caption batch ``captions``, sides alternating."""
    num_images = image_locals.features.shape[0]
    inputs = processor(text=list(captions), return_tensors="pt", padding=True)
    everything = torch.arange(num_images).expand(len(captions), num_images)

    def two_stage() -> torch.Tensor:
        query = model.get_text_features(inputs["input_ids"], inputs["attention_mask"], num_samples=0)
        found = index.search(query.mean, query.log_sigma2 if index.metric == "csd" else None, top_k=top_k)
        words = reranker.encode_texts(inputs["input_ids"], inputs["attention_mask"])
        scores = candidate_scores(reranker, image_locals, words, found.indices, queries_are_images=False)
        return fuse_scores(found.scores, scores, reranker.config.fusion_weight)

    def full_gallery() -> torch.Tensor:
        words = reranker.encode_texts(inputs["input_ids"], inputs["attention_mask"])
        return candidate_scores(reranker, image_locals, words, everything, queries_are_images=False)

    two_stage(), full_gallery()  # warm-up
    ratios = []
    for number in range(rounds):
        seconds = {}
        sides = [("a", two_stage), ("b", full_gallery)]
        for name, side in sides if number % 2 == 0 else sides[::-1]:
            start = time.perf_counter()
            side()
            seconds[name] = time.perf_counter() - start
        ratios.append(seconds["a"] / seconds["b"])
    return ratios


def report_ratios(label: str, ratios: list[float]) -> None:
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    print(f"{label}: median {statistics.median(ratios):.3f} (quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}, "
          f"{len(ratios)} alternating rounds)")


def main() -> None:
    args = parse_args()
    if args.quick:
        args.rerankers, args.rounds, args.single_queries = args.rerankers[:1], 4, 10
    if args.train:
        train_missing(args)
    missing = [p for p in [args.dual_encoder, *args.rerankers] if not (Path(p) / "config.json").exists()]
    if missing:
        raise SystemExit(f"Not trained yet: {', '.join(missing)}. Train them (see the docstring) or pass --train.")

    torch.manual_seed(0)
    model = PCMEModel.from_pretrained(args.dual_encoder).eval()
    processor = PCMEProcessor.from_pretrained(args.dual_encoder)
    recipe = load_recipe(Path(args.dual_encoder) / "recipe.yaml")
    view = make_retrieval_split(load_dataset_by_name(recipe.data.name, split="test", **recipe.data.options))
    accelerator = Accelerator(cpu=True)
    scorer = default_scorer(model)
    images, texts = encode_for_scorer(model, processor, view, accelerator, scorer=scorer, batch_size=250,
                                      num_samples=model.config.num_samples)
    first = first_stage_scores(model, images, texts, scorer, seed=recipe.seed, num_samples=model.config.num_samples)
    baseline = metrics_from_matrices(view, first, first)
    print(f"shapes test split: {view.num_images} images, {view.num_captions} captions; first stage: {scorer}; "
          f"re-ranked: top-{args.rerank_top_k} per query, both directions\n")
    print(f"{'':<28}" + "".join(f"{key:>9}" for key in KEYS))
    print(row("dual encoder alone", baseline))
    reranked, imram_only = [], []
    for folder in args.rerankers:
        reranker = IMRAMModel.from_pretrained(folder).eval()
        image_locals, text_locals = encode_local_features(reranker, processor, view, batch_size=250)
        i2t, t2i = reranked_matrices(first, reranker, image_locals, text_locals, args.rerank_top_k, fusion_weight=1.0)
        imram_only.append(metrics_from_matrices(view, i2t, t2i))
        print(row(f"+ IMRAM order {Path(folder).name}", imram_only[-1]))
        weight = reranker.config.fusion_weight
        i2t, t2i = reranked_matrices(first, reranker, image_locals, text_locals, args.rerank_top_k)
        reranked.append(metrics_from_matrices(view, i2t, t2i))
        print(row(f"+ fused a={weight:g} {Path(folder).name}", reranked[-1]))
    print(f"(a = config.fusion_weight, chosen on the val split by scripts/choose_fusion_weight.py; a = 1: IMRAM order)")
    for label, results in ((f"+ IMRAM order, mean of {len(imram_only)}", imram_only), (f"+ fused, mean of {len(reranked)}", reranked)):
        mean = {key: statistics.fmean(m[key] for m in results) for key in KEYS}
        print(row(label, mean))
        print(row("  difference (mean - alone)", {key: mean[key] - baseline[key] for key in KEYS}))
        if len(results) > 1:
            print(row("  std over re-ranker seeds", {key: statistics.stdev(m[key] for m in results) for key in KEYS}))

    reranker = IMRAMModel.from_pretrained(args.rerankers[0]).eval()
    image_locals, _ = encode_local_features(reranker, processor, view, batch_size=250)
    index = CrossModalIndex.from_embeddings(images.mean, images.log_sigma2, modality="image", metric=default_metric(model))
    torch.set_num_threads(1)
    captions = view.captions.select_columns(["caption"])[: args.query_batch]["caption"]
    print(f"\ncost per caption query, re-rank the top-{args.rerank_top_k} of {view.num_images} images / IMRAM on all "
          f"{view.num_images} (target <= 0.15), one thread:")
    report_ratios(f"  batches of {len(captions)} queries (throughput)",
                  time_ratios(model, reranker, processor, captions, image_locals, index, args.rerank_top_k, args.rounds))
    report_ratios("  one query at a time (latency)",
                  [time_ratios(model, reranker, processor, [caption], image_locals, index, args.rerank_top_k, 1)[0]
                   for caption in captions[: args.single_queries]])


if __name__ == "__main__":
    main()
