"""save_pretrained / from_pretrained round trips, Auto* classes, remote code, broken folders."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModel, AutoProcessor

from hf_pcme import PCMEModel, PCMEProcessor
from hf_pcme.testing import TINY_CAPTIONS, tiny_images, tiny_pcme_config, tiny_processor


def _embed(model, inputs):
    image = model.get_image_features(inputs["pixel_values"], generator=torch.Generator().manual_seed(0))
    text = model.get_text_features(
        inputs["input_ids"], inputs["attention_mask"], generator=torch.Generator().manual_seed(1)
    )
    return image, text, model.match_probability(image, text)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pcme")
    model = PCMEModel(tiny_pcme_config()).eval()
    processor = tiny_processor()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


def test_round_trip_gives_identical_outputs(saved):
    folder, model, processor = saved
    inputs = processor(images=tiny_images(3), text=list(TINY_CAPTIONS[:3]))
    reloaded = AutoModel.from_pretrained(folder).eval()
    assert isinstance(reloaded, PCMEModel)
    expected_weights = model.state_dict()
    assert reloaded.state_dict().keys() == expected_weights.keys()
    for name, weight in reloaded.state_dict().items():
        assert torch.equal(weight, expected_weights[name]), name
    # Same weights, same inputs: the outputs agree up to float32 rounding (CPU matmul kernels may
    # sum in another order when the loaded tensors sit at another memory alignment).
    for before, after in zip(_embed(model, inputs), _embed(reloaded, inputs)):
        if isinstance(before, torch.Tensor):
            torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-7)
        else:
            for key in ("mean", "log_sigma2", "samples", "attention"):
                torch.testing.assert_close(after[key], before[key], rtol=1e-6, atol=1e-7, msg=key)


def test_folder_holds_safetensors_and_remote_code(saved):
    folder, _, _ = saved
    files = set(os.listdir(folder))
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert {"modeling_pcme.py", "configuration_pcme.py", "heads.py", "losses.py", "processing_pcme.py"} <= files
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_pcme.PCMEConfig", "AutoModel": "modeling_pcme.PCMEModel"}


def test_processor_round_trip(saved):
    folder, _, processor = saved
    loaded = AutoProcessor.from_pretrained(folder)
    assert isinstance(loaded, PCMEProcessor)
    images, texts = tiny_images(2), ["a red circle", "some shapes"]
    expected, got = processor(images=images, text=texts), loaded(images=images, text=texts)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_remote_code_loads_without_the_package_installed(saved):
    folder, model, processor = saved
    inputs = processor(images=tiny_images(2), text=list(TINY_CAPTIONS[:2]))
    expected = _embed(model, inputs)[2]
    torch.save(dict(inputs), folder.parent / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_pcme"] = None  # make `import hf_pcme` fail: only the folder's code may be used
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = torch.load({str(folder.parent / "inputs.pt")!r})
        image = model.get_image_features(inputs["pixel_values"], generator=torch.Generator().manual_seed(0))
        text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"],
                                       generator=torch.Generator().manual_seed(1))
        torch.save(model.match_probability(image, text), {str(folder.parent / "remote.pt")!r})
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(folder.parent / "modules"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(folder.parent / "remote.pt"), expected, rtol=1e-6, atol=1e-7)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    PCMEModel(tiny_pcme_config()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        PCMEModel.from_pretrained(tmp_path)


def test_corrupt_weights_file_is_a_clear_error(tmp_path):
    PCMEModel(tiny_pcme_config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(OSError, match="corrupt or truncated"):
        PCMEModel.from_pretrained(tmp_path)


def test_weights_of_another_configuration_are_refused(tmp_path):
    PCMEModel(tiny_pcme_config(head_type="deterministic", loss_type="vsepp")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["head_type"] = "probabilistic"
    config["loss_type"] = "pcme"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(OSError, match="uncertainty_branch"):
        PCMEModel.from_pretrained(tmp_path)
