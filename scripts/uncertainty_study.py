"""The uncertainty study (docs/uncertainty.md): every shapes recipe x several seeds, one table (docs/uncertainty.md).

    python scripts/uncertainty_study.py [--recipes pcme pcme++ ...] [--seeds 0 1 2] [--output-dir runs/study]
                                        [--quick] [key=value ...]
    python scripts/uncertainty_study.py --merge runs/a/results.json runs/b/results.json   (one table of several runs)

For each recipe (``configs/shapes_<name>.yaml``) and seed (the model's ``seed``; the data, and so the
test split, stay those of the recipe) it trains, evaluates on the shapes *test* split, and reports

- Spearman(caption sigma^2, vagueness): vagueness = plausible test images per caption (exact labels);
- PMRP i2t / t2i and RSUM (each model ranked by its own score);
- AUROC of caption sigma^2 as a predictor of the caption's t2i R@1 failure, and ECE of the match
  probability against exact plausibility (:func:`hf_pcme.uncertainty.compute_uncertainty_report`);

then prints the mean +- std over seeds as a markdown table and writes every number to
``results.json``. Deterministic recipes have no sigma: their uncertainty columns are empty. Trailing
``key=value`` overrides apply to every recipe (e.g. ``train.phase2_epochs=1`` for a fast look).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from scipy.stats import spearmanr

import hf_pcme  # noqa: F401
from hf_pcme.data import load_dataset_by_name, make_retrieval_split
from hf_pcme.training import load_recipe
from hf_pcme.training.trainer import train
from hf_pcme.uncertainty import compute_uncertainty_report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from main_job import QUICK_OVERRIDES, REPO_ROOT, evaluate_on_test  # noqa: E402

#: name in the table -> recipe file; the study's default order (faithful recipes first).
STUDY_RECIPES = {
    "deterministic": "shapes_deterministic.yaml",
    "csd_deterministic": "shapes_csd_deterministic.yaml",
    "pcme": "shapes_pcme.yaml",
    "pcme_frozen_sigma": "shapes_pcme_frozen_sigma.yaml",
    "pcme++": "shapes_pcmepp.yaml",
    "pcmepp_mixup": "shapes_pcmepp_mixup.yaml",
    "pcmepp_dedup": "shapes_pcmepp_dedup.yaml",
    "prolip": "shapes_prolip.yaml",
    "prolip_dedup": "shapes_prolip_dedup.yaml",
    "prolip_dupincl": "shapes_prolip_dupincl.yaml",
    "infonce_dupincl": "shapes_infonce_dupincl.yaml",
}
COLUMNS = ("spearman", "i2t_pmrp", "t2i_pmrp", "mean_pmrp", "rsum", "auroc", "ece")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(STUDY_RECIPES),
                        help=f"recipe names (default: all): {', '.join(STUDY_RECIPES)}; or paths to YAML files")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="model seeds (default 0 1 2)")
    parser.add_argument("--output-dir", default="runs/uncertainty_study")
    parser.add_argument("--quick", action="store_true", help="tiny data and one epoch: a smoke run, not a measurement")
    parser.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                        help="train nothing: print one table of the rows of these results.json files")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to every recipe")
    return parser.parse_args(argv)


def recipe_path(name: str) -> Path:
    if name in STUDY_RECIPES:
        return REPO_ROOT / "configs" / STUDY_RECIPES[name]
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"Unknown recipe {name!r}: use one of {', '.join(STUDY_RECIPES)} or a YAML file path.")
    return path


def uncertainty_metrics(name: str, result: dict, test_view, model) -> dict[str, float]:
    """AUROC of caption sigma^2 for a t2i R@1 failure, and ECE of p(match) against exact plausibility."""
    report = compute_uncertainty_report(model, test_view, result["images"], result["texts"], scorer=result["scorer"],
                                        name=name)
    values = {"ece": float(report.calibration.ece)}
    auroc = report.failure_auroc.get("t2i")
    if auroc is not None:
        values["auroc"] = float(auroc)
    return values


def run_one(name: str, seed: int, overrides: list[str], output_dir: Path, test_view, vagueness, accelerator) -> dict:
    recipe = load_recipe(recipe_path(name), [f"output_dir={output_dir / f'{name}_seed{seed}'}", f"seed={seed}",
                                             *overrides])
    started = time.perf_counter()
    trained = train(recipe)
    result = evaluate_on_test(trained.model, trained.processor, test_view, recipe, accelerator)
    metrics = result["metrics"]
    row = {"recipe": name, "seed": seed, "i2t_pmrp": metrics["i2t_pmrp"], "t2i_pmrp": metrics["t2i_pmrp"],
           "mean_pmrp": (metrics["i2t_pmrp"] + metrics["t2i_pmrp"]) / 2, "rsum": metrics["rsum"],
           "train_seconds": time.perf_counter() - started}
    variance = result["caption_variance"]
    if variance is not None:
        row["spearman"] = float(spearmanr(variance, vagueness)[0])
        row["sigma2_min"], row["sigma2_max"] = float(variance.min()), float(variance.max())
        row["sigma2_per_level"] = {int(level): float(variance[test_view.caption_specificity == level].mean())
                                   for level in sorted(set(test_view.caption_specificity.tolist()))}
    row.update(uncertainty_metrics(name, result, test_view, trained.model))
    del trained, result
    gc.collect()
    return row


def summarise(rows: list[dict], names: list[str]) -> dict[str, dict[str, tuple[float, float, int]]]:
    table = {}
    for name in names:
        mine = [row for row in rows if row["recipe"] == name]
        table[name] = {}
        for column in COLUMNS:
            values = [row[column] for row in mine if row.get(column) is not None and math.isfinite(row[column])]
            if values:
                table[name][column] = (float(np.mean(values)), float(np.std(values)), len(values))
    return table


def markdown_table(table: dict, counts: bool = False) -> str:
    """Mean ± std per recipe and column; with ``counts`` a last column gives the number of seeds."""
    header = "| recipe | " + " | ".join(COLUMNS) + (" | seeds |" if counts else " |")
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1 + counts)]
    for name, columns in table.items():
        cells = []
        for column in COLUMNS:
            if column in columns:
                mean, std, count = columns[column]
                digits = 3 if column in ("spearman", "auroc", "ece") else 1
                cells.append(f"{mean:+.{digits}f} ± {std:.{digits}f}" if column == "spearman"
                             else f"{mean:.{digits}f} ± {std:.{digits}f}")
            else:
                cells.append("–")
        if counts:
            cells.append(str(max((count for _, _, count in columns.values()), default=0)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.merge:
        rows = [row for path in args.merge for row in json.loads(Path(path).read_text())["rows"]]
        names = list(dict.fromkeys(name for name in [*STUDY_RECIPES, *(row["recipe"] for row in rows)]
                                   if any(row["recipe"] == name for row in rows)))
        seeds = sorted({row["seed"] for row in rows})
        print(f"{len(rows)} runs (seeds {seeds}) from {len(args.merge)} file(s)\n")
        print(markdown_table(summarise(rows, names), counts=True))
        return
    output_dir = Path(args.output_dir)
    overrides = (QUICK_OVERRIDES if args.quick else []) + list(args.overrides)
    started = time.perf_counter()
    first = load_recipe(recipe_path(args.recipes[0]), overrides)
    test_split = load_dataset_by_name(first.data.name, split="test", **first.data.options)
    test_view = make_retrieval_split(test_split)
    vagueness = test_view.plausibility.plausible_images_per_caption()
    accelerator = Accelerator()
    rows = []
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in args.recipes:
        for seed in args.seeds:
            print(f"\n=== {name}, seed {seed} ===", flush=True)
            row = run_one(name, seed, overrides, output_dir, test_view, vagueness, accelerator)
            rows.append(row)
            print(json.dumps(row), flush=True)
            (output_dir / "results.json").write_text(json.dumps({"rows": rows, "overrides": overrides}, indent=2))
    table = summarise(rows, args.recipes)
    command = "python scripts/uncertainty_study.py " + " ".join(
        (["--quick"] if args.quick else []) + ["--recipes", *args.recipes, "--seeds", *map(str, args.seeds)]
        + list(args.overrides))
    print(f"\n{command}\nmean ± std over seeds {args.seeds} on the shapes test split "
          f"({test_view.num_images} images, {test_view.num_captions} captions); "
          f"{(time.perf_counter() - started) / 60:.1f} min\n")
    print(markdown_table(table))
    (output_dir / "results.json").write_text(json.dumps(
        {"rows": rows, "table": table, "command": command, "overrides": overrides}, indent=2))


if __name__ == "__main__":
    main()
