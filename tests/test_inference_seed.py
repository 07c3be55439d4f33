"""Repeatable inference: in eval mode the Monte-Carlo samples are a function of the inputs and a seed."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hf_pcme import PCMEModel
from hf_pcme.testing import TINY_CAPTIONS, tiny_images, tiny_pcme_config, tiny_processor

REPO = Path(__file__).resolve().parent.parent
SHAPES_OPTIONS = {"num_images": 8, "num_eval_images": 12, "image_size": 32}


@pytest.fixture(scope="module")
def model_and_inputs():
    torch.manual_seed(0)
    # sigma^2 = 1 next to unit-norm means: the sampled match probability is mostly noise, so any
    # change in the samples shows in the outputs.
    model = PCMEModel(tiny_pcme_config(init_log_sigma2=0.0)).eval()
    inputs = tiny_processor()(images=tiny_images(3), text=list(TINY_CAPTIONS), return_tensors="pt")
    return model, inputs


def test_eval_mode_same_input_same_output(model_and_inputs):
    model, inputs = model_and_inputs
    with torch.no_grad():
        first, second = model(**inputs), model(**inputs)
    assert first.text_embeds.samples is not None
    assert torch.equal(first.image_embeds.samples, second.image_embeds.samples)
    assert torch.equal(first.text_embeds.samples, second.text_embeds.samples)
    assert torch.equal(first.match_prob, second.match_prob)


def test_match_probability_of_features_equals_forward(model_and_inputs):
    model, inputs = model_and_inputs
    with torch.no_grad():
        out = model(**inputs)
        images = model.get_image_features(inputs["pixel_values"])
        texts = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        assert torch.equal(model.match_probability(images, texts), out.match_prob)


def test_samples_are_the_seeded_draws_and_modalities_are_independent(model_and_inputs):
    model, inputs = model_and_inputs
    with torch.no_grad():
        images = model.get_image_features(inputs["pixel_values"], num_samples=0)
        sampled = model.get_image_features(inputs["pixel_values"])
        texts = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
    seed, num_samples = model.config.inference_seed, model.config.num_samples
    eps = torch.randn((3, num_samples, 8), generator=torch.Generator().manual_seed(2 * seed))
    expected = images.mean.unsqueeze(1) + torch.exp(0.5 * images.log_sigma2).unsqueeze(1) * eps
    torch.testing.assert_close(sampled.samples, expected)
    # captions draw from their own stream: their noise is not the images' noise
    text_eps = (texts.samples - texts.mean.unsqueeze(1)) / torch.exp(0.5 * texts.log_sigma2).unsqueeze(1)
    assert not torch.allclose(text_eps[:3], eps, atol=1e-3)


def test_generator_overrides_the_seed(model_and_inputs):
    model, inputs = model_and_inputs
    with torch.no_grad():
        default = model(**inputs).match_prob
        one = model(**inputs, generator=torch.Generator().manual_seed(123)).match_prob
        again = model(**inputs, generator=torch.Generator().manual_seed(123)).match_prob
    assert torch.equal(one, again)
    assert not torch.allclose(one, default)


def test_training_mode_samples_differ(model_and_inputs):
    model, inputs = model_and_inputs
    model.train()
    try:
        with torch.no_grad():
            first, second = model(**inputs), model(**inputs)
    finally:
        model.eval()
    assert not torch.allclose(first.text_embeds.samples, second.text_embeds.samples)


def test_inference_seed_none_gives_fresh_noise():
    model = PCMEModel(tiny_pcme_config(init_log_sigma2=0.0, inference_seed=None)).eval()
    pixel_values = tiny_processor()(images=tiny_images(2), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        first, second = model.get_image_features(pixel_values), model.get_image_features(pixel_values)
    assert not torch.allclose(first.samples, second.samples)


def test_inference_seed_survives_save_and_load(tmp_path, model_and_inputs):
    model, inputs = model_and_inputs
    model.config.inference_seed = 7
    try:
        model.save_pretrained(tmp_path)
        reloaded = PCMEModel.from_pretrained(tmp_path).eval()
    finally:
        model.config.inference_seed = 0
    assert reloaded.config.inference_seed == 7
    with torch.no_grad():
        assert torch.equal(
            reloaded.get_image_features(inputs["pixel_values"]).samples,
            model.get_image_features(inputs["pixel_values"], generator=torch.Generator().manual_seed(14)).samples,
        )


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_script_and_main_job_give_the_same_metrics(tmp_path):
    from accelerate import Accelerator

    from hf_pcme.data import load_dataset_by_name, make_retrieval_split

    torch.manual_seed(0)
    folder = tmp_path / "model"
    PCMEModel(tiny_pcme_config(init_log_sigma2=0.0)).save_pretrained(folder)
    processor = tiny_processor()
    processor.save_pretrained(folder)
    cache_dir = tmp_path / "cache"
    options = [f"--dataset-option={key}={value}" for key, value in {**SHAPES_OPTIONS, "cache_dir": cache_dir}.items()]

    def evaluate_script(*extra):
        return _load_script("evaluate").main(["--model", str(folder), "--dataset", "shapes", "--split", "test",
                                              "--output", str(tmp_path / "results.json"), *options, *extra])

    from_script = evaluate_script()
    view = make_retrieval_split(load_dataset_by_name("shapes", split="test", cache_dir=cache_dir, **SHAPES_OPTIONS))
    recipe = SimpleNamespace(eval=SimpleNamespace(batch_size=5, num_samples=None), seed=0)  # another batch size
    model = PCMEModel.from_pretrained(folder)
    from_main_job = _load_script("main_job").evaluate_on_test(model, processor, view, recipe, Accelerator(cpu=True))
    assert from_main_job["scorer"] == "sampled"
    assert from_main_job["metrics"] == from_script
    # the comparison has teeth: other samples give other metrics on this noisy model
    assert evaluate_script("--seed", "1") != from_script


def test_a_generator_on_another_device_is_named(model_and_inputs):
    model, _ = model_and_inputs
    # only the device types are compared, so this runs without a GPU
    with pytest.raises(ValueError, match=r"generator is on cpu but the embeddings are on cuda:0.*torch.Generator\(device='cuda:0'\)"):
        model._sampling_generator(torch.device("cuda:0"), torch.Generator(), stream=0)


def test_eval_mode_generator_is_created_on_the_inputs_device(model_and_inputs):
    model, _ = model_and_inputs
    generator = model._sampling_generator(torch.device("cpu"), None, stream=1)
    assert generator.device.type == "cpu"
    assert generator.initial_seed() == 2 * model.config.inference_seed + 1
