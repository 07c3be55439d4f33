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
``--uncertainty-report`` adds the uncertainty analysis (``hf_pcme.uncertainty``: sigma^2 vs
vagueness, metrics per uncertainty bin, failure AUROC, calibration), printed and written as
``uncertainty_report.json`` + PNG plots next to the model (or in ``--output-dir``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Heavy imports (torch, transformers, hf_pcme) happen in main(), so that --help answers at once.

#: The ranking scores of ``hf_pcme.metrics.SCORERS`` (tests/test_scripts_output.py checks they agree).
SCORER_CHOICES = ("cosine", "csd", "euclidean", "polysemous", "sampled")


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
    parser.add_argument("--uncertainty-report", action="store_true",
                        help="also analyse the uncertainty (whole split): print it, write its JSON and PNG plots")
    parser.add_argument("--output-dir", help="folder of the uncertainty report (default: the model folder, else .)")
    parser.add_argument("--protocol", choices=["coco", "eccv_caption", "cxc"],
                        help="COCO 5K test: eccv_caption adds ECCV Caption mAP@R / R-P / R@1 and CxC R@K "
                             "(pip install hf_pcme[eccv]); default: coco when the split is whole 1K folds")
    parser.add_argument("--reranker", help="an IMRAM model folder: re-rank each query's first-stage top-K with it")
    parser.add_argument("--rerank-top-k", type=int, default=50, help="candidates re-ranked per query (with --reranker)")
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
    from hf_pcme.uncertainty import format_uncertainty_report, write_uncertainty_report

    accelerator = Accelerator()
    model = AutoModel.from_pretrained(args.model).to(accelerator.device)
    processor = AutoProcessor.from_pretrained(args.model)
    view = make_retrieval_split(load_dataset_by_name(args.dataset, **dataset_kwargs(args)))
    scorer = args.scorer or default_scorer(model)
    accelerator.print(f"{args.dataset}/{args.split}: {view.num_images} images, {view.num_captions} captions; "
                      f"scorer {scorer}")
    images, texts = encode_for_scorer(model, processor, view, accelerator, scorer=scorer, batch_size=args.batch_size,
                                      num_samples=args.num_samples, progress_bar=True)
    protocol = args.protocol or coco_protocol(args.dataset, view)
    ids = {}
    if protocol in ("eccv_caption", "cxc"):
        from hf_pcme.data.views import column_as_numpy

        ids = {"image_ids": column_as_numpy(view.images, "image_id"), "text_ids": column_as_numpy(view.captions, "caption_id")}
    metrics = retrieval_metrics(model, view, images, texts, scorer=scorer, protocol=protocol, seed=args.seed,
                                num_samples=args.num_samples, **ids)
    first_stage, ranking = None, scorer
    if args.reranker:
        from hf_pcme.rerank_evaluation import load_reranker, rerank_metrics

        reranker = load_reranker(args.reranker, model, args.rerank_top_k).to(accelerator.device)
        first_stage = metrics
        metrics = rerank_metrics(model, reranker, processor, view, images, texts, scorer=scorer,
                                 rerank_top_k=args.rerank_top_k, protocol=protocol,
                                 seed=args.seed, num_samples=args.num_samples, batch_size=args.batch_size,
                                 progress_bar=accelerator.is_main_process)
        ranking = f"{scorer}, top-{args.rerank_top_k} re-ranked by IMRAM"
    if not accelerator.is_main_process:
        return metrics
    if first_stage is not None:
        print_table(first_stage, f"{args.model} alone (first stage), percent")
    print_table(metrics, f"{args.model} on {args.dataset}/{args.split} ({ranking}), percent")
    if protocol in ("eccv_caption", "cxc"):
        from hf_pcme.metrics.eccv_caption import pcmepp_table

        print(f"\nPCME++-style table ({protocol}), percent\n{pcmepp_table(metrics)}")
    folder = Path(args.model)
    output = Path(args.output) if args.output else (folder if folder.is_dir() else Path(".")) / f"eval_{args.dataset}_{args.split}.json"
    output.write_text(json.dumps({"model": args.model, "dataset": args.dataset, "split": args.split,
                                  "scorer": ranking, "metrics": metrics, "reranker": args.reranker,
                                  "first_stage_metrics": first_stage}, indent=2))
    print(f"\nresults: {output}")
    if args.uncertainty_report:
        report_dir = Path(args.output_dir) if args.output_dir else (folder if folder.is_dir() else Path("."))
        report = write_uncertainty_report(report_dir, model, view, images, texts, scorer=scorer, name=args.model,
                                          seed=args.seed)
        print("\n" + format_uncertainty_report(report))
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
