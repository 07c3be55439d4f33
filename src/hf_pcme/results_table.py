"""The README's results table, written from the main job's ``results.json`` so the two never drift.

    python scripts/main_job.py --update-readme              # run, then rewrite README.md's table
    python -m hf_pcme.results_table runs/main_job/results.json README.md     # only rewrite the table
    python -m hf_pcme.results_table runs/q/results.json --write-reference tests/reference/main_job_quick.json

The table lives between two marker comments in the README (:data:`START_MARKER`, :data:`END_MARKER`);
everything outside them is kept byte for byte. The reference file is the part of a ``--quick``
run's results that must reproduce in the pinned environment (``constraints.txt``): the metrics,
rounded to 4 decimals, and which score ranked each model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

START_MARKER = "<!-- main-job-table:start -->"
END_MARKER = "<!-- main-job-table:end -->"

MODEL_LABELS = {"pcme": "PCME", "pcme++": "PCME++", "prolip_dupincl": "PCME++ + inclusion",
                "infonce_dupincl": "InfoNCE means + inclusion sigma", "deterministic": "deterministic, InfoNCE"}
SCORER_LABELS = {"sampled": "sampled", "csd": "CSD", "cosine": "cosine", "polysemous": "best pair"}


#: Distributions whose versions change the numbers (recorded in results.json, shown under the table).
ENVIRONMENT_PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "accelerate", "numpy", "numba", "pillow")


def environment() -> dict[str, str]:
    """Python and the versions of :data:`ENVIRONMENT_PACKAGES` in this process (``"absent"`` if not installed)."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ENVIRONMENT_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def markdown_table(results: dict[str, Any]) -> str:
    """The table of a main-job ``results.json``: PMRP and R@1/5/10 both ways and RSUM, in percent, one row per model."""
    lines = [
        "| model | i2t PMRP | t2i PMRP | i2t R@1/5/10 | t2i R@1/5/10 | RSUM |",
        "|---|---|---|---|---|---|",
    ]
    scorers = results.get("scorers", {})
    for name, metrics in results["metrics"].items():
        scorer = scorers.get(name)
        label = MODEL_LABELS.get(name, name) + (f" ({SCORER_LABELS.get(scorer, scorer)})" if scorer else "")
        recalls = {d: " / ".join(f"{metrics[f'{d}_R@{k}']:.1f}" for k in (1, 5, 10)) for d in ("i2t", "t2i")}
        lines.append(
            f"| {label} | {metrics['i2t_pmrp']:.1f} | {metrics['t2i_pmrp']:.1f} | {recalls['i2t']} | "
            f"{recalls['t2i']} | {metrics['rsum']:.1f} |"
        )
    correlations = results.get("uncertainty_vs_vagueness") or {}
    if correlations:
        lines += ["", "Spearman correlation of a caption's mean sigma^2 with its number of plausible test images: "
                  + ", ".join(f"{MODEL_LABELS.get(name, name)} {report['spearman_rho']:+.2f}"
                              for name, report in correlations.items()) + "."]
    versions = results.get("environment")
    if versions:
        lines += ["", "Written by `python scripts/main_job.py --update-readme` in: "
                  + ", ".join(f"{name} {version}" for name, version in versions.items()) + "."]
    return "\n".join(lines)


def replace_between_markers(text: str, body: str, path: str | Path = "README.md") -> str:
    """``text`` with everything between :data:`START_MARKER` and :data:`END_MARKER` replaced by ``body``."""
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < 0 or end < start:
        raise ValueError(
            f"{path} has no results block: add the lines {START_MARKER} and {END_MARKER} (in this order) where the "
            "table goes."
        )
    return text[: start + len(START_MARKER)] + "\n" + body.strip("\n") + "\n" + text[end:]


def update_readme(results_path: str | Path, readme_path: str | Path) -> Path:
    """Rewrite the table in ``readme_path`` from ``results_path``; returns the README's path."""
    results = json.loads(Path(results_path).read_text(encoding="utf-8"))
    readme = Path(readme_path)
    readme.write_text(replace_between_markers(readme.read_text(encoding="utf-8"), markdown_table(results), readme),
                      encoding="utf-8")
    return readme


def reference_from_results(results: dict[str, Any]) -> dict[str, Any]:
    """What a ``--quick`` run must reproduce: each model's scorer and metrics (rounded to 4 decimals)."""
    return {
        "scorers": dict(results.get("scorers", {})),
        "metrics": {
            name: {key: round(float(value), 4) for key, value in sorted(metrics.items())}
            for name, metrics in results["metrics"].items()
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="a main-job results.json")
    parser.add_argument("readme", nargs="?", help="the README to rewrite between the markers")
    parser.add_argument("--write-reference", metavar="PATH", help="write the reference file of a --quick run")
    args = parser.parse_args(argv)
    if args.readme:
        print(f"table written to {update_readme(args.results, args.readme)}")
    if args.write_reference:
        results = json.loads(Path(args.results).read_text(encoding="utf-8"))
        Path(args.write_reference).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write_reference).write_text(json.dumps(reference_from_results(results), indent=2) + "\n")
        print(f"reference written to {args.write_reference}")
    if not (args.readme or args.write_reference):
        print(markdown_table(json.loads(Path(args.results).read_text(encoding="utf-8"))))


if __name__ == "__main__":
    main()


__all__ = ["END_MARKER", "START_MARKER", "markdown_table", "reference_from_results", "replace_between_markers",
           "update_readme"]
