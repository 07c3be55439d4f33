"""Multi-stage (webly supervised) training: both stages run, each is resumable, the card lists both datasets."""

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
from hf_pcme.training.stages import StagedTrainer, plan_stages
from hf_pcme.training.trainer import train
from train_callbacks import KillAfterSteps

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shapes_webly.yaml"

# Stage 1: 24 web images (one tag text each) -> 3 batches of 8 per epoch, 4 steps (crosses an
# epoch). Stage 2: 8 clean images x 5 captions = 40 rows -> 5 batches, 5 steps (crosses an epoch).
# Checkpoints every 2 steps and at the stage boundary (step 4); validation on 4 images at the end.
TINY = [
    "model.vision_config={model_type: resnet, embedding_size: 8, hidden_sizes: [8, 16], depths: [1, 1], "
    "layer_type: basic, downsample_in_first_stage: false}",
    "model.text_config={model_type: pcme_bigru, word_dim: 8, hidden_size: 16}",
    "model.embed_dim=8",
    "model.num_samples=3",
    "data.image_size=32",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "eval.max_images=4",
    "stages.0.steps=4",
    "stages.1.steps=5",
    "stages.1.frozen=[word_embeddings]",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("webly_cache")


def _overrides(output_dir, cache_dir, *extra):
    return [
        *TINY,
        f"data.options={{num_images: 8, num_eval_images: 4, image_size: 32, cache_dir: {cache_dir}}}",
        f"stages.0.data.options={{num_images: 24, seed: 1, image_size: 32, cache_dir: {cache_dir}}}",
        f"output_dir={output_dir}",
        *extra,
    ]


def _recipe(output_dir, cache_dir, *extra):
    return load_recipe(CONFIG, _overrides(output_dir, cache_dir, *extra))


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("webly_uninterrupted")
    result = train(_recipe(out, cache_dir))
    return result, _weights(result.model)


def test_both_stages_run_on_their_own_data(uninterrupted, cache_dir, tmp_path):
    result, weights = uninterrupted
    assert result.global_step == 9 and not result.interrupted
    assert [p.steps for p in plan_stages(_recipe(tmp_path, cache_dir), [3, 5])] == [4, 5]
    epochs_plan = plan_stages(_recipe(tmp_path, cache_dir, "stages.0.steps=null", "stages.0.epochs=2"), [3, 5])
    assert [p.steps for p in epochs_plan] == [6, 5] and [p.lr for p in epochs_plan] == [1e-3, 5e-4]
    trainer = StagedTrainer(_recipe(tmp_path / "x", cache_dir))
    trainer.setup()
    web, clean = trainer.stage_splits
    assert len(web) == 24 and "tags" in web.column_names and web[0]["caption"] == ", ".join(web[0]["tags"])
    assert len(clean) == 40 and "specificity" in clean.column_names
    # The word-level vocabulary covers both stages' texts (tags and captions).
    vocabulary = trainer.processor.tokenizer.get_vocab()
    assert {"some", "shapes", "at", "circle", "small"} <= set(vocabulary)
    # Stage 2 froze the word embeddings: they changed only in stage 1 (the run is not vacuous).
    start = _weights(trainer.model)
    after_stage_1 = _weights(train(_recipe(tmp_path / "s1", cache_dir, "stages.1.steps=0")).model)
    word = [k for k in weights if "embed" in k and k.startswith("text_model.") and weights[k].dim() == 2]
    assert word and all(torch.equal(weights[k], after_stage_1[k]) for k in word)
    assert any(not torch.equal(after_stage_1[k], start[k]) for k in word)
    assert any(not torch.equal(weights[k], after_stage_1[k]) for k in weights if k.startswith("text_head."))
    # The model card lists both datasets and the stages.
    card = (result.output_dir / "README.md").read_text()
    assert "- shapes_web\n- shapes\n" in card
    assert "1. **web**: `shapes_web (num_images=24, seed=1, image_size=32)`, 4 steps" in card
    assert "2. **clean**: `shapes (num_images=8, num_eval_images=4, image_size=32)`, 5 steps" in card


def test_killed_in_stage_2_and_resumed_with_the_script_matches_uninterrupted(uninterrupted, cache_dir, tmp_path):
    _, expected = uninterrupted
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(CONFIG), *_overrides(out, cache_dir)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and process.poll() is None:
            latest = find_latest_checkpoint(out / "checkpoints")
            if latest is not None and read_checkpoint_state(latest)["global_step"] >= 6:
                break
            time.sleep(0.05)
        assert process.poll() is None, f"training ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    state = read_checkpoint_state(find_latest_checkpoint(out / "checkpoints"))
    assert state["phase"] == 1 and state["global_step"] >= 6  # killed in stage 2
    assert not (out / "model.safetensors").exists()
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import train as train_script
    finally:
        sys.path.pop(0)
    assert train_script.main(["--config", str(CONFIG), *_overrides(out, cache_dir), "--resume"]) == 0
    _assert_same_weights(_weights(PCMEModel.from_pretrained(out)), expected)
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 10))
    assert [r["train/phase"] for r in records if "train/loss" in r] == [1] * 4 + [2] * 5


def test_resume_at_the_stage_boundary(uninterrupted, cache_dir, tmp_path):
    _, expected = uninterrupted
    out = tmp_path / "boundary"
    first = train(_recipe(out, cache_dir, "train.checkpoint_every=100"), callbacks=[KillAfterSteps(5)])
    assert first.interrupted
    assert read_checkpoint_state(find_latest_checkpoint(out / "checkpoints"))["global_step"] == 4  # the stage end
    final = train(_recipe(out, cache_dir, "train.checkpoint_every=100"), resume=True)
    _assert_same_weights(_weights(final.model), expected)


def test_stage_recipes_are_checked_before_training(tmp_path, cache_dir):
    with pytest.raises(ValueError, match=r"Unknown recipe key 'stages\[0\]\.data\.nmae'.*'stages\[0\]\.data\.name'"):
        load_recipe(CONFIG, ["stages.0.data={nmae: shapes}"])
    with pytest.raises(ValueError, match=r"'stages\[1\]\.lr' must be >= 0"):
        load_recipe(CONFIG, ["stages.1.lr=-1"])
    with pytest.raises(ValueError, match=r"'stages\[0\]\.frozen\[0\]' must be one of"):
        load_recipe(CONFIG, ["stages.0.frozen=[head]"])
    with pytest.raises(ValueError, match=r"'5' is not an index of a list of 2"):
        load_recipe(CONFIG, ["stages.5.steps=1"])
    recipe = load_recipe(CONFIG, ["stages.0.steps=7"])
    assert recipe.stages[0].steps == 7 and recipe.stages[1].steps is None
    recipe.save(tmp_path / "r.yaml")
    assert load_recipe(tmp_path / "r.yaml") == recipe  # stages survive the YAML round trip


def test_own_imagefolder_data_trains_unchanged(tmp_path, cache_dir):
    from PIL import Image

    root = tmp_path / "photos"
    for split, count in (("train", 8), ("val", 4)):
        lines = []
        for i in range(count):
            (root / split).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (30 * i, 200 - 20 * i, 90)).save(root / split / f"{i}.png")
            lines.append(json.dumps({"file_name": f"{i}.png", "captions": [f"photo {i}", f"picture number {i}"]}))
        (root / split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    recipe = load_recipe(REPO / "configs" / "shapes_pcme.yaml", [
        *TINY[:8], "data.name=imagefolder", f"data.data_dir={root}", f"data.options={{cache_dir: {cache_dir}}}",
        "data.augment=true", "train.phase2_steps=2", f"output_dir={tmp_path / 'run'}",
    ])
    result = train(recipe)
    assert result.global_step == 2 and "rsum" in result.metrics
    assert "- imagefolder" in (tmp_path / "run" / "README.md").read_text()
