"""Choose an IMRAM re-ranker's fusion weight on a validation split and store it in the re-ranker's config.

A re-ranked candidate's final score is ``(1 - alpha) z(first-stage score) + alpha z(IMRAM score)``
(``IMRAMConfig.fusion_weight``, see :func:`hf_pcme.rerank.fuse_scores`). This script ranks the
validation split of the dual encoder's dataset with each alpha of a grid, prints the metrics, and
writes the alpha with the largest ``i2t_R@1 + t2i_R@1`` into ``RERANKER/config.json`` (every row
into ``RERANKER/fusion_weight_selection.json`` and the table into its model card ``README.md``). Never run it on a test split.

    python scripts/choose_fusion_weight.py --dual-encoder runs/shapes_pcme --reranker runs/shapes_imram
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CARD_SECTION = "## Fusion weight"
KEYS = ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "i2t_pmrp", "t2i_pmrp", "rsum")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dual-encoder", required=True, help="the PCME model folder whose top-K is re-ranked")
    parser.add_argument("--reranker", required=True, help="the IMRAM model folder (its config.json is updated)")
    parser.add_argument("--split", default="val", help="a validation split of the dual encoder's dataset")
    parser.add_argument("--rerank-top-k", type=int, default=50)
    parser.add_argument("--grid", type=float, nargs="+", default=None, help="weights to try (default 0, 0.1, ..., 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the table, change nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.split == "test":
        raise SystemExit("--split test: the fusion weight must be chosen on a validation split, not on the test split.")
    import torch
    from accelerate import Accelerator

    import hf_pcme  # noqa: F401  (registers the models)
    from hf_pcme import PCMEModel, PCMEProcessor
    from hf_pcme.data import load_dataset_by_name, make_retrieval_split
    from hf_pcme.rerank_evaluation import (
        FUSION_WEIGHT_GRID,
        encode_local_features,
        first_stage_scores,
        load_reranker,
        select_fusion_weight,
    )
    from hf_pcme.training.config import load_recipe
    from hf_pcme.training.evaluation import default_scorer, encode_for_scorer

    model = PCMEModel.from_pretrained(args.dual_encoder).eval()
    processor = PCMEProcessor.from_pretrained(args.dual_encoder)
    reranker = load_reranker(args.reranker, model, args.rerank_top_k)
    recipe = load_recipe(Path(args.dual_encoder) / "recipe.yaml")
    view = make_retrieval_split(load_dataset_by_name(recipe.data.name, split=args.split, **recipe.data.options))
    scorer = default_scorer(model)
    with torch.no_grad():
        images, texts = encode_for_scorer(model, processor, view, Accelerator(cpu=True), scorer=scorer, batch_size=250,
                                          num_samples=model.config.num_samples)
        first = first_stage_scores(model, images, texts, scorer, seed=recipe.seed, num_samples=model.config.num_samples)
        image_locals, text_locals = encode_local_features(reranker, processor, view, batch_size=250)
    weight, rows = select_fusion_weight(first, reranker, image_locals, text_locals, view, args.rerank_top_k,
                                        tuple(args.grid) if args.grid else FUSION_WEIGHT_GRID)
    print(f"{args.split} split: {view.num_images} images, {view.num_captions} captions; top-{args.rerank_top_k} re-ranked")
    print(f"{'alpha':>6}" + "".join(f"{key:>10}" for key in KEYS))
    for row in rows:
        print(f"{row['fusion_weight']:>6.2f}" + "".join(f"{row[key]:>10.2f}" for key in KEYS))
    print(f"chosen fusion_weight: {weight} (largest i2t_R@1 + t2i_R@1 on {args.split})")
    if not args.dry_run:
        folder = Path(args.reranker)
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        config["fusion_weight"] = weight
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        selection = {"split": args.split, "rerank_top_k": args.rerank_top_k, "criterion": "i2t_R@1 + t2i_R@1",
                     "fusion_weight": weight, "rows": rows}
        (folder / "fusion_weight_selection.json").write_text(json.dumps(selection, indent=2) + "\n")
        card = folder / "README.md"
        if card.exists():  # the table goes into the model card, replacing an earlier one
            text = card.read_text().split(CARD_SECTION)[0].rstrip()
            table = [f"| {row['fusion_weight']:.2f} | " + " | ".join(f"{row[key]:.2f}" for key in KEYS) + " |" for row in rows]
            card.write_text(f"{text}\n\n{CARD_SECTION}\n\nChosen on the {args.split} split (top-{args.rerank_top_k}, "
                            f"largest i2t_R@1 + t2i_R@1): **fusion_weight = {weight}**.\n\n| alpha | " + " | ".join(KEYS)
                            + " |\n|" + "---|" * (len(KEYS) + 1) + "\n" + "\n".join(table) + "\n")
        print(f"wrote fusion_weight={weight} into {config_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
