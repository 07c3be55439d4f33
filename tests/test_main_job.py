"""The main job end to end in its --quick mode: train four models, evaluate, save, reload, retrieve, report.

The quick run's metrics must equal ``tests/reference/main_job_quick.json``, written in the pinned
environment (``constraints.txt``). After a change that moves the numbers on purpose, regenerate it:

    python scripts/main_job.py --quick --num-threads 1 --output-dir runs/quick
    python -m hf_pcme.results_table runs/quick/results.json --write-reference tests/reference/main_job_quick.json
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("main_job")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(output_dir / "datasets_cache"))
    result = subprocess.run(
        # one thread: fast on a busy CI machine; the reference below is for one thread (the thread count
        # changes the last bits of every sum, and with them the metrics)
        [sys.executable, str(REPO / "scripts" / "main_job.py"), "--quick", "--num-threads", "1", "--output-dir",
         str(output_dir)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir, result.stdout


def test_reports_every_model_and_the_correlation(quick_run):
    output_dir, stdout = quick_run
    summary = json.loads((output_dir / "results.json").read_text())
    assert set(summary["metrics"]) == {"pcme", "pcme++", "infonce_dupincl", "deterministic"}
    assert set(summary["uncertainty_analysis"]) == set(summary["metrics"])
    for metrics in summary["metrics"].values():
        for key in ("i2t_pmrp", "t2i_pmrp", "i2t_R@1", "t2i_R@10"):
            assert 0.0 <= metrics[key] <= 100.0
        assert metrics["rsum"] == pytest.approx(sum(metrics[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
    for name in ("pcme", "pcme++", "infonce_dupincl"):
        report = summary["uncertainty_vs_vagueness"][name]
        assert -1.0 <= report["spearman_rho"] <= 1.0
        assert [row["level"] for row in report["levels"]] == [0, 1, 2, 3, 4]
        # "some shapes" fits every test image; exact captions fit few.
        assert report["levels"][4]["mean_plausible_images"] == 60.0
        assert report["levels"][0]["mean_plausible_images"] < report["levels"][4]["mean_plausible_images"]
        assert Path(report["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"Spearman rho = {report['spearman_rho']:+.3f}" in stdout
    assert "reloading" in stdout and "p(match)" in stdout


def test_saves_the_pcme_model_with_its_card(quick_run):
    output_dir, _ = quick_run
    folder = output_dir / "pcme"
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert "model-index" in (folder / "README.md").read_text()


def test_quick_run_reproduces_the_reference(quick_run):
    from hf_pcme.results_table import reference_from_results

    output_dir, _ = quick_run
    reference = json.loads((REPO / "tests" / "reference" / "main_job_quick.json").read_text())
    assert reference_from_results(json.loads((output_dir / "results.json").read_text())) == reference, (
        "The --quick metrics differ from tests/reference/main_job_quick.json: a different environment than "
        "constraints.txt, or a change that moves the numbers (regenerate the reference, see this file's docstring)."
    )


def test_ends_with_a_summary(quick_run):
    output_dir, stdout = quick_run
    summary = stdout[stdout.index("=== summary ==="):]
    for name in ("pcme", "pcme++", "deterministic"):
        assert f"model + processor: {output_dir / name}" in summary
        assert f"model card: {output_dir / name / 'README.md'}" in summary
    assert f"plot: {output_dir / 'pcme' / 'uncertainty_vs_vagueness.png'}" in summary
    assert "best rsum" in summary and "validation (val, percent): i2t_R@1" in summary
    assert "Embedding" not in stdout and "\r" not in stdout  # no progress bars when the output is not a terminal
