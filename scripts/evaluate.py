"""Evaluate a saved PCME model (local folder or Hub id) on COCO, CUB or shapes.

    python scripts/evaluate.py --model runs/shapes_pcme --dataset shapes --split test
    python scripts/evaluate.py --model user/pcme-coco --dataset coco --data-dir /data/coco --split test \
        --karpathy-json /data/coco/dataset_coco.json --output results.json --update-card
    accelerate launch scripts/evaluate.py ...   # images and captions are embedded in shards, one per process

Embeds every image and caption of the split (progress bars), ranks with the model's own score
(``--scorer`` to override: cosine, csd, sampled, polysemous), and reports R@1/5/10 both ways, RSUM,
R-Precision, MAP@R and PMRP: COCO instance labels (zeta 0, 1, 2; plus the 5-fold "1K" protocol
on the 5K test split), CUB classes, or shapes' exact plausibility. Prints a table, writes the
results as JSON, and with ``--update-card`` adds them to the model card's ``model-index``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Heavy imports (torch, transformers, hf_pcme) happen in main(), so that --help answers at once.

#: The ranking scores of ``hf_pcme.metrics.SCORERS`` (tests/test_scripts_output.py checks they agree).
SCORER_CHOICES = ("cosine", "csd", "polysemous", "sampled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved model folder or a Hub id")
    parser.add_argument("--dataset", required=True, help="coco, cub or shapes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data-dir", help="dataset root (COCO / CUB); not needed for shapes")
    parser.add_argument("--karpathy-json", help="COCO: path of dataset_coco.json (default: under --data-dir)")
    parser.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                        help="extra loader argument, e.g. num_images=4000 for shapes (repeatable)")
    parser.add_argument("--scorer", choices=SCORER_CHOICES, help="ranking score (default: the model's own)")
    parser.add_argument("--num-samples", type=int, help="J, for --scorer sampled (default: the model's num_samples)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, help="seed of the Monte-Carlo samples (default: the model's inference_seed)")
    parser.add_argument("--output", help="results JSON (default: <model folder>/eval_<dataset>_<split>.json)")
    parser.add_argument("--update-card", action="store_true", help="add the results to the model card's model-index")
    return parser.parse_args(argv)


def dataset_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    kwargs: dict[str, Any] = {"split": args.split}
    if args.data_dir:
        kwargs["data_dir"] = args.data_dir
    if args.karpathy_json:
        kwargs["karpathy_json"] = args.karpathy_json
    for option in args.dataset_option:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ValueError(f"--dataset-option must look like KEY=VALUE, got {option!r}.")
        kwargs[key] = yaml.safe_load(value)
    return kwargs


def print_table(metrics: dict[str, float], title: str) -> None:
    from hf_pcme.evaluation import metric_display_name

    print(f"\n{title}")
    prefixes = sorted({key.rpartition("/")[0] for key in metrics}, key=lambda p: (p != "", p))
    for prefix in prefixes:
        keys = [key for key in metrics if key.rpartition("/")[0] == prefix]
        if prefix:
            print(f"  [{prefix}]")
        width = max(len(metric_display_name(key)) for key in keys)
        for key in keys:
            print(f"  {metric_display_name(key):<{width}}  {metrics[key]:8.2f}")


def update_model_card(folder: Path, metrics: dict[str, float], dataset: str, split: str) -> Path:
    """Add (or replace) this dataset/split's results in ``folder/README.md``'s model-index."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from hf_pcme.evaluation import TASK_NAME, TASK_TYPE, metric_display_name

    path = folder / "README.md"
    card = ModelCard.load(path) if path.is_file() else ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n")
    kept = [
        result for result in (card.data.eval_results or [])
        if not (result.dataset_type == dataset and result.dataset_split == split)
    ]
    new = [
        EvalResult(task_type=TASK_TYPE, task_name=TASK_NAME, dataset_type=dataset, dataset_name=dataset,
                   dataset_split=split, metric_type=key, metric_name=metric_display_name(key),
                   metric_value=round(value, 4))
        for key, value in metrics.items()
    ]
    card.data.eval_results = kept + new
    if card.data.model_name is None:
        card.data.model_name = folder.name
    card.save(path)
    return path


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    from accelerate import Accelerator
    from transformers import AutoModel, AutoProcessor

    import hf_pcme  # noqa: F401  (registers "pcme")
    from hf_pcme.data import load_dataset_by_name, make_retrieval_split
    from hf_pcme.evaluation import coco_protocol, default_scorer, encode_for_scorer, retrieval_metrics

    accelerator = Accelerator()
    model = AutoModel.from_pretrained(args.model).to(accelerator.device)
    processor = AutoProcessor.from_pretrained(args.model)
    view = make_retrieval_split(load_dataset_by_name(args.dataset, **dataset_kwargs(args)))
    scorer = args.scorer or default_scorer(model)
    accelerator.print(f"{args.dataset}/{args.split}: {view.num_images} images, {view.num_captions} captions; "
                      f"scorer {scorer}")
    images, texts = encode_for_scorer(model, processor, view, accelerator, scorer=scorer, batch_size=args.batch_size,
                                      num_samples=args.num_samples, progress_bar=True)
    metrics = retrieval_metrics(model, view, images, texts, scorer=scorer, protocol=coco_protocol(args.dataset, view),
                                seed=args.seed, num_samples=args.num_samples)
    if not accelerator.is_main_process:
        return metrics
    print_table(metrics, f"{args.model} on {args.dataset}/{args.split} ({scorer}), percent")
    folder = Path(args.model)
    output = Path(args.output) if args.output else (folder if folder.is_dir() else Path(".")) / f"eval_{args.dataset}_{args.split}.json"
    output.write_text(json.dumps({"model": args.model, "dataset": args.dataset, "split": args.split,
                                  "scorer": scorer, "metrics": metrics}, indent=2))
    print(f"\nresults: {output}")
    if args.update_card:
        if not folder.is_dir():
            raise ValueError(f"--update-card needs a local model folder; {args.model!r} is not one. Download it first.")
        print(f"model card: {update_model_card(folder, metrics, args.dataset, args.split)}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
