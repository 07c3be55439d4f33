"""Resuming: a run killed mid-way and resumed ends with exactly the weights of an uninterrupted run (CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_pcme import PCMEModel
from hf_pcme.training.checkpointing import find_latest_checkpoint, read_checkpoint_state
from hf_pcme.training.config import load_recipe
from hf_pcme.training.trainer import Trainer, plan_phases, train
from hf_pcme.training.callbacks import TrainerCallback
from train_callbacks import KillAfterSteps

REPO = Path(__file__).resolve().parents[1]

# 8 images x 5 captions = 40 rows; global batch 8 -> 5 micro-batches per epoch, 2 accumulated
# steps per epoch (the 5th micro-batch is dropped). Phase 1 (3 steps, vision tower frozen) and
# phase 2 (5 steps) both cross epoch boundaries; validation (4 images) at steps 3, 6 and 8.
TINY = [
    "model.vision_config={model_type: resnet, embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1], "
    "layer_type: basic, downsample_in_first_stage: false}",
    "model.text_config={model_type: pcme_bigru, word_dim: 8, hidden_size: 16}",
    "model.embed_dim=8",
    "model.num_samples=3",
    "data.image_size=32",
    "train.batch_size=8",
    "train.grad_accum=2",
    "train.phase1_steps=3",
    "train.phase2_steps=5",
    "train.phase1_frozen=[vision, word_embeddings]",
    "train.warmup_steps=2",
    "train.checkpoint_every=2",
    "train.keep_last=2",
    "train.log_every=1",
    "train.eval_every=3",  # validation must not disturb the training RNG
    "eval.max_images=4",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core machine: OpenMP threads only contend (10-20x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes_cache")


def _recipe(output_dir, cache_dir, *extra):
    options = f"data.options={{num_images: 8, num_eval_images: 4, image_size: 32, cache_dir: {cache_dir}}}"
    return load_recipe(REPO / "configs" / "shapes_pcme.yaml", [*TINY, options, f"output_dir={output_dir}", *extra])


def _weights(result_or_dir):
    if isinstance(result_or_dir, Path):
        model = PCMEModel.from_pretrained(result_or_dir)
    else:
        model = result_or_dir.model
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = train(_recipe(out, cache_dir))
    return result, _weights(result)


def test_phase_plan_and_uninterrupted_run(uninterrupted, cache_dir, tmp_path):
    result, weights = uninterrupted
    assert result.global_step == 8 and not result.interrupted
    assert [p.steps for p in plan_phases(_recipe(tmp_path, cache_dir), steps_per_epoch=2)] == [3, 5]
    # save_pretrained output reloads to the same weights.
    _assert_same_weights(_weights(result.output_dir), weights)
    # Phase 1 froze the vision tower: it changed only in phase 2 (the run is not vacuous).
    initial = _weights(train(_recipe(tmp_path / "p1", cache_dir, "train.phase2_steps=0")))
    fresh = Trainer(_recipe(tmp_path / "fresh", cache_dir))
    fresh.setup()
    start = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    vision = [k for k in start if k.startswith("vision_model.") and start[k].is_floating_point() and "running" not in k]
    assert all(torch.equal(initial[k], start[k]) for k in vision)
    assert any(not torch.equal(weights[k], start[k]) for k in vision)
    assert any(not torch.equal(initial[k], start[k]) for k in start if k.startswith("text_head."))


def test_killed_twice_then_resumed_matches_uninterrupted(uninterrupted, cache_dir, tmp_path):
    _, expected = uninterrupted
    out = tmp_path / "run"
    # Stop after step 2 (phase 1, epoch 1 done), then after step 5 (phase 2, mid-epoch): each
    # "kill" leaves the last periodic checkpoint (2, then 4) and loses the steps after it.
    first = train(_recipe(out, cache_dir), callbacks=[KillAfterSteps(2)])
    assert first.interrupted and first.global_step == 2
    second = train(_recipe(out, cache_dir), resume=True, callbacks=[KillAfterSteps(5)])
    assert second.interrupted and second.global_step == 5
    assert read_checkpoint_state(find_latest_checkpoint(out / "checkpoints"))["global_step"] == 4
    final = train(_recipe(out, cache_dir), resume=True)
    assert final.global_step == 8 and not final.interrupted
    _assert_same_weights(_weights(final), expected)
    # The JSON-lines log holds each step once, although steps 3-5 ran twice.
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 9))
    assert [r["step"] for r in records if "eval/rsum" in r] == [3, 6, 8]
    assert final.best_metric is not None and (out / "best" / "model.safetensors").exists()


def test_callbacks_see_every_step_and_stopping_leaves_no_final_save(cache_dir, tmp_path):
    class Record(TrainerCallback):
        def __init__(self):
            self.calls = []

        def on_step_end(self, trainer, step):
            self.calls.append((step, trainer.model is not None))

    record = Record()
    result = train(_recipe(tmp_path / "run", cache_dir), callbacks=[record, KillAfterSteps(3)])
    assert result.interrupted and result.global_step == 3
    assert record.calls == [(1, True), (2, True), (3, True)]
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_the_old_test_hook_is_gone_from_recipes():
    with pytest.raises(ValueError, match="train.stop_after_steps"):
        load_recipe(REPO / "configs" / "shapes_pcme.yaml", ["train.stop_after_steps=2"])


def test_resume_without_checkpoint_starts_from_scratch(uninterrupted, cache_dir, tmp_path):
    _, expected = uninterrupted
    result = train(_recipe(tmp_path / "empty", cache_dir), resume=True)
    _assert_same_weights(_weights(result), expected)


def test_process_killed_by_signal_resumes_to_the_same_weights(uninterrupted, cache_dir, tmp_path):
    _, expected = uninterrupted
    out = tmp_path / "killed"
    overrides = [arg for arg in TINY] + [
        f"data.options={{num_images: 8, num_eval_images: 4, image_size: 32, cache_dir: {cache_dir}}}",
        f"output_dir={out}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(REPO / "configs" / "shapes_pcme.yaml"),
         *overrides],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            latest = find_latest_checkpoint(out / "checkpoints")
            if latest is not None and read_checkpoint_state(latest)["global_step"] >= 4:
                break
            time.sleep(0.05)
        assert process.poll() is None, f"training ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert not (out / "model.safetensors").exists()  # the run never finished
    result = train(_recipe(out, cache_dir), resume=True)
    _assert_same_weights(_weights(result), expected)


def test_end_of_run_artifacts_and_push_to_hub(cache_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants
    import yaml
    from hub_server import StandInHub

    out = tmp_path / "pushed"
    with StandInHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setenv("HF_TOKEN", "hf_stand_in_token")
        result = train(_recipe(out, cache_dir, "train.phase1_steps=1", "train.phase2_steps=1"),
                       push_to_hub="pcme-user/shapes-tiny")
    assert not hub.unexpected
    files = hub.commits[-1].files
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
                 "README.md", "recipe.yaml", "eval_results.json", "modeling_pcme.py"):
        assert name in files, f"{name} missing from the pushed commit"
    assert not any(name.startswith(("checkpoints/", "logs/", "best/")) for name in files)
    # The pushed weights are the trained ones.
    from safetensors.torch import load as load_safetensors

    pushed = load_safetensors(files["model.safetensors"])
    trained = result.model.state_dict()
    assert all(torch.equal(pushed[k], trained[k]) for k in pushed)
    # The card: YAML front matter with the recipe's tags, the usage snippet with the repo id, the recipe.
    card = files["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "pcme" in front["tags"]
    assert 'from_pretrained("pcme-user/shapes-tiny")' in card
    assert "loss_type: pcme" in card and "## Limitations" in card and "## Intended use" in card
    (results,) = front["model-index"][0]["results"]
    assert {m["type"]: m["value"] for m in results["metrics"]} == pytest.approx(result.metrics, abs=1e-4)
    assert json.loads(files["eval_results.json"])["metrics"] == result.metrics
    assert "rsum" in result.metrics and "i2t_pmrp" in result.metrics
    # The saved recipe reloads to the recipe that was run.
    assert load_recipe(out / "recipe.yaml") == _recipe(out, cache_dir, "train.phase1_steps=1", "train.phase2_steps=1")
