"""The main job: PCME vs a deterministic baseline on the embedded *shapes* data, offline, on a CPU.

    python scripts/main_job.py [--output-dir runs/main_job] [--quick] [--ablations] [--seeds 0 1 2]
        [--update-readme] [--num-threads 2] [key=value ...]

1. trains PCME (``configs/shapes_pcme.yaml``), PCME++ (``configs/shapes_pcmepp.yaml``: CSD loss
   with pseudo-positives), the decoupled inclusion recipe (``configs/shapes_infonce_dupincl.yaml``:
   the means trained by the baseline's InfoNCE and ranked by their cosine, the variances only by
   ProLIP-style "image inside caption" and "caption inside word-dropped caption" inclusion terms,
   where a caption must include every image whose training caption has the same text;
   docs/uncertainty.md)
   and the deterministic baseline (``configs/shapes_deterministic.yaml``), all with the same towers,
   data and schedule; ``--ablations`` adds PCME with frozen sigma (``shapes_pcme_frozen_sigma.yaml``)
   and a deterministic head trained with PCME++'s loss (``shapes_csd_deterministic.yaml``);
2. evaluates them on the shapes *test* split: PMRP (exact plausibility) and R@1/5/10 in both
   directions, each ranking by its own score;
3. saves the PCME model with its processor and model card, reloads it with ``from_pretrained``
   and runs one retrieval through ``pipeline("cross-modal-retrieval")``;
4. reports, for every probabilistic model, how the learned caption uncertainty (mean sigma^2)
   relates to caption vagueness (the number of test images a caption is plausible for): Spearman
   correlation, a table per specificity level, and a scatter plot saved next to each model; and
   the analysis of :mod:`hf_pcme.uncertainty` (binned metrics, AUROC of sigma^2 for an R@1
   failure, calibration of the match probability) with its plots, for every model.

``--seeds 0 1 2`` instead runs the 3-seed study of ``scripts/uncertainty_study.py`` on the same
recipes (about 4x longer per seed than one main job) and prints its mean +- std table.
Trailing ``key=value`` arguments override every recipe (e.g. ``train.phase2_epochs=1``). Nothing
here tunes the data or the metric toward a particular number: the correlation is reported with its
sign, whatever it is.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

# torch, transformers, scipy and hf_pcme are imported where they are used, so that --help answers at once.

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    "pcme": REPO_ROOT / "configs/shapes_pcme.yaml",
    "pcme++": REPO_ROOT / "configs/shapes_pcmepp.yaml",
    "infonce_dupincl": REPO_ROOT / "configs/shapes_infonce_dupincl.yaml",
    "deterministic": REPO_ROOT / "configs/shapes_deterministic.yaml",
}
#: Same towers, data and schedule, with one ingredient removed (``--ablations``).
ABLATIONS = {
    "pcme_frozen_sigma": REPO_ROOT / "configs/shapes_pcme_frozen_sigma.yaml",
    "csd_deterministic": REPO_ROOT / "configs/shapes_csd_deterministic.yaml",
}
QUICK_OVERRIDES = ["data.options.num_images=300", "data.options.num_eval_images=60", "train.phase2_epochs=1",
                   "eval.max_images=60"]
PROBABILISTIC = ("pcme", "pcme++", "infonce_dupincl")
TABLE_KEYS = ("i2t_pmrp", "t2i_pmrp", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum")
LEVEL_NAMES = {0: "exact", 1: "all shapes, no positions", 2: "kind + colour", 3: "one attribute", 4: "some shapes"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/main_job", help="where models, plot and results go")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (seconds), not a measurement")
    parser.add_argument("--num-threads", type=int, default=2,
                        help="torch CPU threads (default 2, as for the README's table: results depend on it)")
    parser.add_argument("--update-readme", action="store_true",
                        help="rewrite README.md's results table (between its main-job-table markers) from this run")
    parser.add_argument("--ablations", action="store_true",
                        help="also train PCME with frozen sigma and a deterministic head with PCME++'s loss")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="run the multi-seed study (scripts/uncertainty_study.py) on these seeds instead")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides applied to every recipe")
    args = parser.parse_args()
    if args.update_readme and (args.quick or args.overrides or args.ablations or args.seeds):
        parser.error("--update-readme writes the README's measured table: run the plain full job (no --quick, "
                     "--ablations, --seeds or overrides).")
    return args


def evaluate_on_test(model, processor, test_view, recipe, accelerator) -> dict:
    """Test-split metrics of one model (ranked by its own score), its embeddings, and per-level results."""
    from hf_pcme.evaluation import default_scorer, encode_for_scorer, retrieval_metrics

    scorer = default_scorer(model)
    images, texts = encode_for_scorer(model, processor, test_view, accelerator, scorer=scorer,
                                      batch_size=recipe.eval.batch_size, num_samples=recipe.eval.num_samples)
    # seed and J default to the model's inference_seed and num_samples, as in scripts/evaluate.py
    metrics = retrieval_metrics(model, test_view, images, texts, scorer=scorer, num_samples=recipe.eval.num_samples)
    levels = {
        int(level): retrieval_metrics(model, test_view, images, texts, scorer=scorer, num_samples=recipe.eval.num_samples,
                                      caption_rows=np.flatnonzero(test_view.caption_specificity == level))
        for level in sorted(set(test_view.caption_specificity.tolist()))
    }
    caption_variance = None if texts.log_sigma2 is None else texts.log_sigma2.exp().mean(-1).cpu().numpy()
    return {"metrics": metrics, "levels": levels, "caption_variance": caption_variance, "scorer": scorer,
            "images": images, "texts": texts}


def uncertainty_report(name: str, result: dict, test_view, vagueness: np.ndarray, model_dir: Path) -> dict:
    """Spearman(caption sigma^2, vagueness), a per-level table, and the scatter plot of one probabilistic model."""
    from scipy.stats import spearmanr

    variance = result["caption_variance"]
    rho, p_value = spearmanr(variance, vagueness)
    direction = "LARGER" if rho > 0 else "SMALLER"
    print(f"\n{name}: caption uncertainty vs vagueness (plausible test images per caption)")
    print(f"  Spearman rho = {rho:+.3f} (p = {max(p_value, 1e-300):.2g}, n = {len(vagueness)}): "
          f"vaguer captions get {direction} sigma^2")
    print(f"  {'level':<6}{'specificity':<27}{'captions':>9}{'mean sigma^2':>14}{'plausible imgs':>16}{'t2i PMRP':>10}")
    rows = []
    for level, metrics in result["levels"].items():
        chosen = test_view.caption_specificity == level
        row = {"level": level, "description": LEVEL_NAMES.get(level, ""), "captions": int(chosen.sum()),
               "mean_sigma2": float(variance[chosen].mean()), "mean_plausible_images": float(vagueness[chosen].mean()),
               "t2i_pmrp": metrics["t2i_pmrp"]}
        rows.append(row)
        print(f"  {level:<6}{row['description']:<27}{row['captions']:>9}{row['mean_sigma2']:>14.4g}"
              f"{row['mean_plausible_images']:>16.1f}{row['t2i_pmrp']:>10.2f}")
    plot_path = model_dir / "uncertainty_vs_vagueness.png"
    save_plot(plot_path, name, variance, vagueness, test_view.caption_specificity, float(rho))
    print(f"  plot: {plot_path}")
    return {"spearman_rho": float(rho), "p_value": float(p_value), "n": int(len(vagueness)), "levels": rows,
            "plot": str(plot_path)}


def save_plot(path: Path, name: str, caption_variance: np.ndarray, vagueness: np.ndarray, levels: np.ndarray,
              rho: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4.5), dpi=120)
    for level in sorted(set(levels.tolist())):
        chosen = levels == level
        axis.scatter(vagueness[chosen], caption_variance[chosen], s=8, alpha=0.6, label=f"level {level}: {LEVEL_NAMES.get(level, '')}")
    axis.set_xscale("log")
    axis.set_xlabel("plausible test images per caption (vagueness)")
    axis.set_ylabel("caption uncertainty: mean sigma^2")
    axis.set_title(f"{name} on shapes: Spearman rho = {rho:+.3f}")
    axis.legend(fontsize=7, markerscale=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def print_table(results: dict[str, dict]) -> None:
    header = f"{'model':<15}" + "".join(f"{key:>10}" for key in TABLE_KEYS)
    print(header)
    print("-" * len(header))
    for name, values in results.items():
        print(f"{name:<15}" + "".join(f"{values['metrics'][key]:>10.2f}" for key in TABLE_KEYS))


def main() -> None:
    args = parse_args()
    import torch
    from accelerate import Accelerator
    from transformers import AutoModel, AutoProcessor, pipeline

    import hf_pcme  # noqa: F401  (registers "pcme" and the pipeline)
    from hf_pcme.data import load_dataset_by_name, make_retrieval_split
    from hf_pcme.results_table import environment, update_readme
    from hf_pcme.training import load_recipe
    from hf_pcme.training.summary import run_summary
    from hf_pcme.training.trainer import train
    from hf_pcme.uncertainty import format_uncertainty_report, write_uncertainty_report

    # How CPU kernels split their sums depends on the thread count, and with it the last bits of every
    # result: a fixed count (not the machine's core count) makes the numbers reproduce on any machine.
    torch.set_num_threads(args.num_threads)
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    overrides = (QUICK_OVERRIDES if args.quick else []) + list(args.overrides)
    recipes = {**RECIPES, **(ABLATIONS if args.ablations else {})}
    if args.seeds is not None:
        from uncertainty_study import main as study

        study(["--recipes", *recipes, "--seeds", *map(str, args.seeds), "--output-dir", str(output_dir / "study"),
               *(["--quick"] if args.quick else []), *args.overrides])
        return

    results: dict[str, dict] = {}
    trained = {}
    for name, recipe_path in recipes.items():
        recipe = load_recipe(recipe_path, [f"output_dir={output_dir / name}", *overrides])
        print(f"\n=== training {name} ({recipe_path.name}) ===", flush=True)
        result = train(recipe)
        trained[name] = (result, recipe)

    accelerator = Accelerator()  # for encoding the test split (device, autocast)
    recipe = trained["pcme"][1]
    test_split = load_dataset_by_name(recipe.data.name, split="test", **recipe.data.options)
    test_view = make_retrieval_split(test_split)
    vagueness = test_view.plausibility.plausible_images_per_caption()
    print(f"\n=== evaluating on the shapes test split: {test_view.num_images} images, {test_view.num_captions} captions ===")
    for name, (result, recipe) in trained.items():
        results[name] = evaluate_on_test(result.model, result.processor, test_view, recipe, accelerator)
    print_table(results)

    uncertainty = {
        name: uncertainty_report(name, results[name], test_view, vagueness, trained[name][0].output_dir)
        for name in PROBABILISTIC
    }
    analysis = {}
    for name, values in results.items():
        report = write_uncertainty_report(trained[name][0].output_dir / "uncertainty", trained[name][0].model,
                                          test_view, values["images"], values["texts"], scorer=values["scorer"],
                                          name=name)
        print("\n" + format_uncertainty_report(report))
        analysis[name] = report.to_dict()
    print("\ncaption -> image PMRP per specificity level")
    print(f"  {'level':<6}" + "".join(f"{name:>15}" for name in results))
    for level in results["deterministic"]["levels"]:
        print(f"  {level:<6}" + "".join(f"{results[name]['levels'][level]['t2i_pmrp']:>15.2f}" for name in results))
    pmrp = {name: (values["metrics"]["i2t_pmrp"] + values["metrics"]["t2i_pmrp"]) / 2 for name, values in results.items()}
    print("\nPMRP (mean of both directions): " + ", ".join(f"{name} {value:.2f}" for name, value in pmrp.items())
          + "; vs deterministic: " + ", ".join(f"{name} {pmrp[name] - pmrp['deterministic']:+.2f}"
                                                for name in pmrp if name != "deterministic"))

    pcme_dir = trained["pcme"][0].output_dir
    print(f"\n=== reloading {pcme_dir} with from_pretrained and retrieving with the pipeline ===")
    model = AutoModel.from_pretrained(pcme_dir)
    processor = AutoProcessor.from_pretrained(pcme_dir)
    retriever = pipeline("cross-modal-retrieval", model=model, processor=processor)
    query_row = 0
    query = test_view.images[query_row]
    corpus = sorted(set(test_view.captions["caption"]))
    answer = retriever(images=[query["image"]], corpus=corpus, top_k=5)[0]
    truth = [c for c, row in zip(test_view.captions["caption"], test_view.text_to_image) if row == query_row]
    print(f"query: test image {query_row}, described as: {truth[0]!r}; query uncertainty {answer['query_uncertainty']:.4g}")
    for rank, item in enumerate(answer["results"], start=1):
        print(f"  {rank}. score {item['score']:+.3f}  p(match) = {item['match_probability']:.3f}  "
              f"sigma^2 = {item['uncertainty']:.4g}  {item['text']}")

    summary = {
        "metrics": {name: values["metrics"] for name, values in results.items()},
        "scorers": {name: values["scorer"] for name, values in results.items()},
        "per_level_t2i_pmrp": {name: {level: m["t2i_pmrp"] for level, m in values["levels"].items()}
                               for name, values in results.items()},
        "uncertainty_vs_vagueness": uncertainty,
        "uncertainty_analysis": analysis,
        "quick": args.quick,
        "environment": {**environment(), "torch threads": str(torch.get_num_threads())},
        "seconds": time.perf_counter() - started,
    }
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
    print("\n=== summary ===")
    for name, (result, recipe) in trained.items():
        plots = [uncertainty[name]["plot"]] if name in uncertainty else []
        print(run_summary(result, recipe, plots=plots))
    print(f"test-split results of every model: {output_dir / 'results.json'}  ({summary['seconds']:.0f} s in all)")
    if args.update_readme:
        print(f"README table rewritten: {update_readme(output_dir / 'results.json', REPO_ROOT / 'README.md')}")


if __name__ == "__main__":
    main()
