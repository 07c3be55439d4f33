"""Scripts answer --help at once, saved-model evaluation needs no training code, runs end with a summary."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hf_pcme.results_table import END_MARKER, START_MARKER, markdown_table, replace_between_markers
from hf_pcme.training.summary import format_metrics, run_summary

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "hf_pcme", "accelerate", "datasets")


@pytest.mark.parametrize("script", ["evaluate.py", "train.py", "main_job.py"])
def test_help_imports_nothing_heavy(script):
    code = textwrap.dedent(f"""
        import runpy, sys, time
        sys.argv = [{script!r}, "--help"]
        started = time.perf_counter()
        try:
            runpy.run_path({str(REPO / "scripts" / script)!r}, run_name="__main__")
        except SystemExit:
            pass
        print("SECONDS", time.perf_counter() - started)
        print("HEAVY", sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
    assert "HEAVY []" in result.stdout


def test_evaluate_help_is_fast():
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--model" in result.stdout
    assert time.perf_counter() - started < 5.0  # ~0.1 s on a quiet machine; generous for a loaded CI box


def test_evaluate_script_lists_every_scorer():
    import importlib.util

    from hf_pcme.metrics import SCORERS

    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.SCORER_CHOICES) == set(SCORERS)


def test_saved_model_evaluation_imports_nothing_from_training():
    code = (
        "import sys, hf_pcme, hf_pcme.data, hf_pcme.metrics, hf_pcme.evaluation; "
        "print(sorted(m for m in sys.modules if m.startswith('hf_pcme.training')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_training_evaluation_still_exports_the_moved_names():
    import hf_pcme.evaluation as moved
    import hf_pcme.training.evaluation as old

    for name in ("default_scorer", "encode_for_scorer", "encode_split", "retrieval_metrics", "coco_protocol"):
        assert getattr(old, name) is getattr(moved, name)


def test_run_summary_says_where_and_what(tmp_path):
    result = SimpleNamespace(output_dir=tmp_path / "run", global_step=40, interrupted=False, best_metric=361.25,
                             best_step=30, metrics={"i2t_R@1": 52.0, "rsum": 361.25, "t2i_pmrp": 74.71})
    recipe = SimpleNamespace(name="shapes_pcme", data=SimpleNamespace(eval_split="val"),
                             train=SimpleNamespace(best_metric="rsum"))
    text = run_summary(result, recipe, plots=[tmp_path / "plot.png"])
    assert "shapes_pcme: training finished after 40 steps." in text
    assert f"model + processor: {tmp_path / 'run'}" in text
    assert "validation (val, percent): i2t_R@1 52.00, t2i_pmrp 74.71, rsum 361.25" in text
    assert f"best rsum 361.25 at step 30: {tmp_path / 'run' / 'best'}" in text
    assert f"model card: {tmp_path / 'run' / 'README.md'}" in text and f"plot: {tmp_path / 'plot.png'}" in text
    assert format_metrics({}) == "none (no validation split)"


RESULTS = {
    "metrics": {
        "pcme": {"i2t_pmrp": 71.84, "t2i_pmrp": 74.66, "i2t_R@1": 52.0, "i2t_R@5": 95.2, "i2t_R@10": 99.8,
                 "t2i_R@1": 19.64, "t2i_R@5": 41.0, "t2i_R@10": 47.24, "rsum": 354.88},
        "baseline": {"i2t_pmrp": 84.8, "t2i_pmrp": 82.8, "i2t_R@1": 52.8, "i2t_R@5": 96.0, "i2t_R@10": 99.6,
                     "t2i_R@1": 23.6, "t2i_R@5": 44.0, "t2i_R@10": 51.2, "rsum": 367.2},
    },
    "scorers": {"pcme": "sampled", "baseline": "cosine"},
    "environment": {"python": "3.11.7", "torch": "2.13.0"},
    "uncertainty_vs_vagueness": {"pcme": {"spearman_rho": -0.9512}},
}


def test_markdown_table_rows():
    lines = markdown_table(RESULTS).splitlines()
    assert lines[2] == "| PCME (sampled) | 71.8 | 74.7 | 52.0 / 95.2 / 99.8 | 19.6 / 41.0 / 47.2 | 354.9 |"
    assert lines[3] == "| baseline (cosine) | 84.8 | 82.8 | 52.8 / 96.0 / 99.6 | 23.6 / 44.0 / 51.2 | 367.2 |"
    assert "plausible test images: PCME -0.95." in lines[-3]
    assert lines[-1].endswith("in: python 3.11.7, torch 2.13.0.")


def test_readme_table_is_replaced_between_the_markers_only():
    text = f"# Title\n\nbefore\n{START_MARKER}\nold table\n{END_MARKER}\nafter\n"
    new = replace_between_markers(text, "| new |")
    assert new == f"# Title\n\nbefore\n{START_MARKER}\n| new |\n{END_MARKER}\nafter\n"
    assert replace_between_markers(new, "| new |") == new
    with pytest.raises(ValueError, match="main-job-table:start"):
        replace_between_markers("no markers here", "| new |")


def test_readme_has_the_markers():
    text = (REPO / "README.md").read_text()
    assert text.index(START_MARKER) < text.index(END_MARKER)


def test_train_script_logs_lines_off_a_terminal_and_ends_with_a_summary(tmp_path):
    output_dir = tmp_path / "run"
    overrides = [
        "model.vision_config={model_type: resnet, embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1], "
        "layer_type: basic, downsample_in_first_stage: false}",
        "model.text_config={model_type: pcme_bigru, word_dim: 8, hidden_size: 16}",
        "model.embed_dim=8", "model.num_samples=3", "data.image_size=32", "train.batch_size=8",
        "train.phase1_steps=2", "train.phase2_steps=2", "train.warmup_steps=1", "train.log_every=2",
        "train.eval_every=4", "eval.max_images=4", f"output_dir={output_dir}",
        f"data.options={{num_images: 8, num_eval_images: 4, image_size: 32, cache_dir: {tmp_path / 'cache'}}}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(REPO / "configs" / "shapes_pcme.yaml"),
         *overrides], capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shapes_pcme: step 2/4 loss" in result.stdout and "shapes_pcme: step 4/4 loss" in result.stdout
    assert "\r" not in result.stdout + result.stderr  # no progress bars in a log
    summary = result.stdout[result.stdout.index("shapes_pcme: training finished after 4 steps."):]
    assert f"model + processor: {output_dir}" in summary
    assert "validation (val, percent): i2t_R@1" in summary and "best rsum" in summary
    assert f"model card: {output_dir / 'README.md'}" in summary and (output_dir / "README.md").is_file()


def test_update_readme_rewrites_only_the_table(tmp_path):
    import json

    from hf_pcme.results_table import update_readme

    results, readme = tmp_path / "results.json", tmp_path / "README.md"
    results.write_text(json.dumps(RESULTS))
    readme.write_text(f"intro\n{START_MARKER}\n| old |\n{END_MARKER}\noutro\n")
    update_readme(results, readme)
    assert readme.read_text() == f"intro\n{START_MARKER}\n{markdown_table(RESULTS)}\n{END_MARKER}\noutro\n"
