"""Errors a newcomer meets in the first hour name the file, the argument or the fix."""

import shutil
from pathlib import Path

import pytest
import torch

from hf_pcme import PCMEModel
from hf_pcme.metrics import evaluate_retrieval
from hf_pcme.testing import tiny_images, tiny_pcme_config, tiny_processor

MODULE_PATH = Path(__file__).resolve().parents[1] / "metrics" / "pcme_retrieval"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    PCMEModel(tiny_pcme_config()).save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


def _copy_without(saved, tmp_path, *names):
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    for name in names:
        (folder / name).unlink()
    return folder


def test_missing_config_is_named_by_pcme_model(saved, tmp_path):
    folder = _copy_without(saved, tmp_path, "config.json")
    with pytest.raises(FileNotFoundError, match=f"config.json not found in {folder}"):
        PCMEModel.from_pretrained(folder)


def test_missing_config_is_named_by_auto_model_and_pipeline(saved, tmp_path):
    from transformers import AutoModel, pipeline

    folder = _copy_without(saved, tmp_path, "config.json")
    with pytest.raises(FileNotFoundError, match=f"config.json not found in {folder}"):
        AutoModel.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match=f"config.json not found in {folder}"):
        pipeline("cross-modal-retrieval", model=str(folder))


def test_other_auto_config_errors_pass_through(tmp_path):
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text('{"hidden_size": 4}')  # a config.json without model_type
    with pytest.raises(ValueError, match="model_type"):
        AutoConfig.from_pretrained(tmp_path)


def test_missing_weights_are_named(saved, tmp_path):
    from transformers import AutoModel, pipeline

    folder = _copy_without(saved, tmp_path, "model.safetensors")
    for load in (PCMEModel.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(OSError, match=f"no file named model.safetensors.*found in directory {folder}"):
            load(folder)
    with pytest.raises(ValueError, match="no file named model.safetensors"):  # transformers wraps it
        pipeline("cross-modal-retrieval", model=str(folder))


def test_missing_processor_files_are_named(saved, tmp_path):
    from transformers import AutoProcessor, pipeline

    folder = _copy_without(saved, tmp_path, "processor_config.json", "tokenizer.json", "tokenizer_config.json")
    with pytest.raises(OSError, match="preprocessor_config.json"):
        AutoProcessor.from_pretrained(folder)
    retriever = pipeline("cross-modal-retrieval", model=str(folder))
    with pytest.raises(ValueError, match=r"has no tokenizer.json / tokenizer_config.json"):
        retriever(texts=["a red circle"], corpus=["a blue square"], progress_bar=False)


def test_pipeline_accepts_the_processor_names(saved):
    from transformers import pipeline

    retriever = pipeline("cross-modal-retrieval", model=str(saved))
    corpus = ["a red circle", "a blue square", "some shapes"]
    by_alias = retriever(text=["a red circle"], corpus=corpus, top_k=2, progress_bar=False)
    assert by_alias == retriever(texts=["a red circle"], corpus=corpus, top_k=2, progress_bar=False)
    image = tiny_images(1)[0]
    assert retriever(image=image, corpus=corpus, top_k=2, progress_bar=False) == retriever(
        images=image, corpus=corpus, top_k=2, progress_bar=False
    )
    with pytest.raises(ValueError, match="not both"):
        retriever(text=["a"], texts=["b"], corpus=corpus)


def test_pipeline_names_an_unknown_keyword_before_asking_for_a_query(saved):
    from transformers import pipeline

    retriever = pipeline("cross-modal-retrieval", model=str(saved))
    with pytest.raises(ValueError, match="Unknown argument.*query"):
        retriever(query=["a red circle"], corpus=["a blue square"])


def _scores_case():
    generator = torch.Generator().manual_seed(0)
    text_to_image = torch.arange(4).repeat_interleave(3)
    return text_to_image, torch.randn(4, 12, generator=generator)


def test_metric_detects_transposed_scores():
    text_to_image, scores = _scores_case()
    with pytest.raises(ValueError, match=r"4 captions, got 12 entries; that is the number of images: scores look transposed.*pass scores\.T"):
        evaluate_retrieval(text_to_image=text_to_image, scores=scores.T)
    assert "i2t_R@1" in evaluate_retrieval(text_to_image=text_to_image, scores=scores)


def test_evaluate_module_detects_transposed_scores_and_unknown_keywords():
    evaluate = pytest.importorskip("evaluate")
    metric = evaluate.load(str(MODULE_PATH))
    text_to_image, scores = _scores_case()
    with pytest.raises(ValueError, match="scores look transposed"):
        metric.compute(text_to_image=text_to_image.tolist(), scores=scores.T.numpy())
    with pytest.raises(ValueError, match=r"Unknown argument\(s\) score for pcme_retrieval.*image_labels.*scores"):
        metric.compute(text_to_image=text_to_image.tolist(), score=scores.numpy())
