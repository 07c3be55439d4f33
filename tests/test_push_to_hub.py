"""push_to_hub (ours and transformers') against a stand-in Hub server on 127.0.0.1: no network."""

import ast
import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from hub_server import StandInHub
from safetensors.torch import load as load_safetensors

import hf_pcme
from hf_pcme import PCMEModel, PCMEProcessor
from hf_pcme.hub import PushToHubError, push_to_hub
from hf_pcme.testing import TINY_CAPTIONS, tiny_images, tiny_pcme_config, tiny_processor

REPO_ID = "pcme-user/pcme-tiny"
TOKEN = "hf_stand_in_token"
CARD = "---\nlibrary_name: transformers\ntags:\n- pcme\n---\n\n# Tiny PCME\n\nA card written by the test.\n"
# Every request huggingface_hub makes for create_repo + create_commit with a README.md in it.
PUSH_ENDPOINTS = {
    "POST /api/repos/create",
    "POST /api/validate-yaml",
    "POST /api/models/{repo_id}/preupload/{revision}",
    "POST /api/models/{repo_id}/commit/{revision}",
}


@pytest.fixture
def hub():
    with StandInHub() as server:
        yield server


def _closed_local_url() -> str:
    with StandInHub() as server:
        return server.url  # its port is closed once the server has stopped


@pytest.fixture
def online(monkeypatch):
    """Lift HF_HUB_OFFLINE=1 (set by conftest, read by huggingface_hub at import) for the stand-in only.

    The default endpoint points at a closed local port, so a request that ignored ``endpoint=``
    fails here instead of reaching huggingface.co; telemetry off skips the user-agent's
    agent-detection request (``GET {HF_ENDPOINT}/api/agent-harnesses``).
    """
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", _closed_local_url())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)


@pytest.fixture(scope="module")
def model_and_processor():
    torch.manual_seed(0)
    return PCMEModel(tiny_pcme_config()).eval(), tiny_processor()


def _code_files(*modules: str) -> set[str]:
    """``modules`` and every module they import relatively, transitively: what remote code needs."""
    package = Path(hf_pcme.__file__).parent
    todo = list(modules)
    found: set[str] = set()
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        tree = ast.parse((package / f"{name}.py").read_text())
        imports = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1]
        todo += [node.module for node in imports if node.module]  # `from . import x` is not used here
    return {f"{name}.py" for name in found}


def _embeddings(model, processor):
    inputs = processor(images=tiny_images(3), text=list(TINY_CAPTIONS[:3]))
    with torch.no_grad():
        image = model.get_image_features(inputs["pixel_values"], generator=torch.Generator().manual_seed(0))
        text = model.get_text_features(
            inputs["input_ids"], inputs["attention_mask"], generator=torch.Generator().manual_seed(1)
        )
    return [image.mean, image.log_sigma2, image.samples, text.mean, text.log_sigma2, text.samples]


def _write_files(files: dict[str, bytes], folder: Path) -> Path:
    for path, content in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(content)
    return folder


def test_push_sends_model_processor_code_card_and_extras_in_one_commit(hub, online, model_and_processor, tmp_path):
    model, processor = model_and_processor
    results = tmp_path / "metrics.json"
    results.write_text(json.dumps({"rsum": 123.4}))
    config_before = model.config.to_dict()

    url = push_to_hub(
        model,
        processor,
        REPO_ID,
        model_card=CARD,
        commit_message="First push",
        token=TOKEN,
        endpoint=hub.url,
        extra_files={"results/metrics.json": results},
    )

    # The caller's model is untouched: save_pretrained would have written dtype/architectures/auto_map.
    assert model.config.to_dict() == config_before
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert url == f"{hub.url}/{REPO_ID}/commit/{commit.oid}"
    assert (commit.repo_id, commit.revision, commit.summary) == (REPO_ID, "main", "First push")
    # What should arrive, computed independently: a plain local save of model + processor.
    local = tmp_path / "local"
    copy.deepcopy(model).save_pretrained(local)
    copy.deepcopy(processor).save_pretrained(local)
    expected = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    expected["README.md"] = CARD.encode()
    expected["results/metrics.json"] = results.read_bytes()
    assert commit.files == expected
    assert hub.files(REPO_ID) == expected
    assert _code_files("modeling_pcme", "configuration_pcme", "processing_pcme") <= commit.files.keys()
    config = json.loads(commit.files["config.json"])
    assert config["auto_map"] == {
        "AutoConfig": "configuration_pcme.PCMEConfig",
        "AutoModel": "modeling_pcme.PCMEModel",
    }
    assert {"tokenizer.json", "tokenizer_config.json", "processor_config.json"} <= commit.files.keys()
    assert hub.endpoints_called() == PUSH_ENDPOINTS
    assert hub.unexpected == []
    assert set(hub.authorizations) == {f"Bearer {TOKEN}"}
    assert hub.repos[REPO_ID].private is False


def test_pushed_files_load_into_a_model_with_identical_outputs(hub, online, model_and_processor, tmp_path):
    model, processor = model_and_processor
    push_to_hub(model, processor, REPO_ID, model_card=CARD, token=TOKEN, endpoint=hub.url, private=True)

    folder = _write_files(hub.files(REPO_ID), tmp_path / "from_hub")
    reloaded = PCMEModel.from_pretrained(folder).eval()
    reloaded_processor = PCMEProcessor.from_pretrained(folder)

    assert hub.repos[REPO_ID].private is True
    for before, after in zip(_embeddings(model, processor), _embeddings(reloaded, reloaded_processor)):
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert reloaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_push_to_a_branch_creates_it_and_leaves_main_alone(hub, online, model_and_processor):
    model, processor = model_and_processor
    push_to_hub(model, processor, REPO_ID, model_card=CARD, token=TOKEN, endpoint=hub.url, revision="experiment")

    assert hub.commits[0].revision == "experiment"
    assert hub.files(REPO_ID, "main") == {}
    assert "model.safetensors" in hub.files(REPO_ID, "experiment")
    assert "POST /api/models/{repo_id}/branch/{revision}" in hub.endpoints_called()


def test_default_model_card_has_metadata_and_loading_snippet(hub, online, model_and_processor):
    model, processor = model_and_processor
    push_to_hub(model, processor, REPO_ID, token=TOKEN, endpoint=hub.url)

    card = hub.files(REPO_ID)["README.md"].decode()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f'AutoModel.from_pretrained("{REPO_ID}", trust_remote_code=True)' in card
    assert "head_type='probabilistic'" in card


@pytest.mark.parametrize("repo_id", ["pcme-tiny", "a/b/c", "/pcme-tiny", "pcme-user/", "pcme-user/bad name", "u/a..b"])
def test_malformed_repo_id_is_a_value_error_before_any_request(hub, online, model_and_processor, repo_id):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match="repo_id"):
        push_to_hub(model, processor, repo_id, token=TOKEN, endpoint=hub.url)
    assert hub.calls == []


def test_bad_extra_files_are_value_errors(hub, online, model_and_processor, tmp_path):
    model, processor = model_and_processor
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not an existing file"):
        push_to_hub(model, processor, REPO_ID, endpoint=hub.url, extra_files={"x.json": tmp_path / "missing.json"})
    with pytest.raises(ValueError, match="relative path"):
        push_to_hub(model, processor, REPO_ID, endpoint=hub.url, extra_files={"../x.json": tmp_path / "x.json"})
    with pytest.raises(ValueError, match="overwrite.*config.json"):
        push_to_hub(model, processor, REPO_ID, endpoint=hub.url, extra_files={"config.json": tmp_path / "x.json"})
    assert hub.calls == []


def test_unreachable_hub_raises_and_says_nothing_local_changed(online, model_and_processor, tmp_path):
    model, processor = model_and_processor
    url = _closed_local_url()
    state_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    results = tmp_path / "metrics.json"
    results.write_text("{}")

    with pytest.raises(PushToHubError, match="Nothing local was changed") as caught:
        push_to_hub(model, processor, REPO_ID, token=TOKEN, endpoint=url, extra_files={"metrics.json": results})

    assert "nothing was uploaded" in str(caught.value)
    assert caught.value.__cause__ is not None
    assert results.read_text() == "{}"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state_before[name])


def test_offline_mode_is_reported_as_a_push_error(hub, model_and_processor, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as conftest's HF_HUB_OFFLINE=1
    model, processor = model_and_processor
    with pytest.raises(PushToHubError, match="Nothing local was changed"):
        push_to_hub(model, processor, REPO_ID, token=TOKEN, endpoint=hub.url)
    assert hub.calls == []


def test_refused_commit_says_the_repo_exists_but_nothing_was_committed(hub, online, model_and_processor):
    model, processor = model_and_processor
    hub.refuse("commit", status=403)
    with pytest.raises(PushToHubError, match="the repository exists but no commit was made") as caught:
        push_to_hub(model, processor, REPO_ID, model_card=CARD, token=TOKEN, endpoint=hub.url)
    assert "403" in str(caught.value)
    assert REPO_ID in hub.repos and hub.commits == []


def test_card_with_broken_yaml_is_a_value_error_before_any_request(hub, online, model_and_processor):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match="model_card"):
        push_to_hub(model, processor, REPO_ID, model_card="---\ntags: [unclosed\n---\n", endpoint=hub.url)
    assert hub.calls == []


# ---------------------------------------------------------------------------------------------
# In a subprocess that sees the stand-in through HF_ENDPOINT, as a user's environment would:
# transformers' own model.push_to_hub, and our push_to_hub without an `endpoint` argument.

PUSH_SCRIPT = textwrap.dedent(
    """
    import sys
    from hf_pcme import PCMEModel, PCMEProcessor
    from hf_pcme.hub import push_to_hub

    source, plain_repo, ours_repo = sys.argv[1:]
    model = PCMEModel.from_pretrained(source)
    print(model.push_to_hub(plain_repo))
    print(push_to_hub(model, PCMEProcessor.from_pretrained(source), ours_repo, model_card="# card"))
    """
)


@pytest.fixture(scope="module")
def subprocess_pushes(tmp_path_factory, model_and_processor):
    model, processor = model_and_processor
    source = tmp_path_factory.mktemp("source")
    model.save_pretrained(source)
    processor.save_pretrained(source)
    hf_home = tmp_path_factory.mktemp("hf_home")
    with StandInHub() as server:
        env = {
            **os.environ,
            "HF_ENDPOINT": server.url,
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_TOKEN": TOKEN,
            "HF_HOME": str(hf_home),
        }
        result = subprocess.run(
            [sys.executable, "-c", PUSH_SCRIPT, str(source), "pcme-user/plain", "pcme-user/ours"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=source,
        )
        assert result.returncode == 0, result.stderr
        urls = [line for line in result.stdout.splitlines() if line.startswith("http")]
        yield server, urls, model


def test_transformers_push_to_hub_uploads_weights_config_and_code(subprocess_pushes):
    server, printed_urls, model = subprocess_pushes
    plain = [commit for commit in server.commits if commit.repo_id == "pcme-user/plain"]

    assert len(plain) == 1
    assert printed_urls[0] == f"{server.url}/pcme-user/plain/commit/{plain[0].oid}"
    files = plain[0].files
    assert {"config.json", "model.safetensors", "README.md"} | _code_files("modeling_pcme") <= files.keys()
    assert "processing_pcme.py" not in files  # the processor was not pushed: its code is its own
    assert "AutoModel" in json.loads(files["config.json"])["auto_map"]
    received = load_safetensors(files["model.safetensors"])
    expected = model.state_dict()
    assert received.keys() == expected.keys()
    for name, tensor in received.items():
        assert torch.equal(tensor, expected[name]), name
    assert server.unexpected == []
    # transformers also looks for an existing README.md before pushing; huggingface_hub fetches
    # the agent registry once per process for its user-agent header unless telemetry is disabled.
    required = PUSH_ENDPOINTS | {"HEAD /{repo_id}/resolve/{revision}/{path}"}
    assert required <= server.endpoints_called() <= required | {"GET /api/agent-harnesses"}
    repo_calls = zip(server.calls, server.authorizations)
    assert {auth for call, auth in repo_calls if "agent-harnesses" not in call} == {f"Bearer {TOKEN}"}


def test_push_to_hub_uses_hf_endpoint_when_no_endpoint_is_given(subprocess_pushes):
    server, printed_urls, _ = subprocess_pushes
    ours = [commit for commit in server.commits if commit.repo_id == "pcme-user/ours"]

    assert len(ours) == 1
    assert printed_urls[1] == f"{server.url}/pcme-user/ours/commit/{ours[0].oid}"
    assert ours[0].files["README.md"] == b"# card"
    assert {"model.safetensors", "tokenizer.json"} <= ours[0].files.keys()
