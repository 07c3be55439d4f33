"""Push a PCME model, its processor, a model card and extra files to the Hugging Face Hub in one commit.

``model.push_to_hub`` (transformers) uploads the weights, config and remote code, and
``processor.push_to_hub`` makes a second commit; :func:`push_to_hub` writes everything a user
needs (weights + config + ``trust_remote_code`` python files + processor + ``README.md`` + e.g. a
results JSON or a plot) into a temporary folder and uploads it with a single
``HfApi.create_commit``, so the repository never holds a model without its processor or card.
"""

from __future__ import annotations

import copy
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import httpx2
import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PreTrainedModel, ProcessorMixin

DEFAULT_COMMIT_MESSAGE = "Upload PCME model, processor and model card"

# "namespace/name": one slash, both parts non-empty; the Hub's finer rules are checked by validate_repo_id.
_REPO_ID_FORM = re.compile(r"^[^/\s]+/[^/\s]+$")

# Everything that can fail on the way to the Hub: HTTP status errors (HfHubHTTPError is both),
# transport errors of huggingface_hub's HTTP client, and OS-level connection / offline-mode errors.
_NETWORK_ERRORS = (httpx2.HTTPError, OSError)


class PushToHubError(OSError):
    """Raised when talking to the Hub failed; the original error is chained as ``__cause__``."""


def push_to_hub(
    model: PreTrainedModel,
    processor: ProcessorMixin | None,
    repo_id: str,
    *,
    model_card: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    private: bool = False,
    token: str | bool | None = None,
    revision: str | None = None,
    extra_files: Mapping[str, str | Path] | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload ``model`` + ``processor`` + ``README.md`` (+ ``extra_files``) to ``repo_id`` in one commit.

    Args:
        model: the model; saved with ``save_pretrained`` (config.json with ``auto_map``,
            model.safetensors, and the python files ``trust_remote_code=True`` needs).
            It is not modified: ``save_pretrained`` writes ``dtype`` / ``architectures`` /
            ``auto_map`` into the config it saves, so the save goes through a private copy of it.
        processor: saved next to the model (``None`` to push the model alone).
        repo_id: ``"namespace/name"``; created if missing (``exist_ok``).
        model_card: text of ``README.md`` (markdown, optionally with YAML front matter);
            ``None`` writes a short default card.
        commit_message: summary line of the commit.
        private: visibility of the repository if it is created (ignored if it exists).
        token: Hub token; ``None`` uses the logged-in token or ``HF_TOKEN``.
        revision: branch to commit to; created from ``main`` if missing. ``None``: ``main``.
        extra_files: ``{path in repo: local file}``, e.g. ``{"results/coco.json": "out/coco.json"}``.
        endpoint: Hub URL (a mirror or a local stand-in); ``None`` uses ``HF_ENDPOINT`` or huggingface.co.

    Returns:
        The URL of the commit.

    Raises:
        ValueError: malformed ``model``, ``processor``, ``repo_id``, ``model_card`` front matter or
            ``extra_files`` (checked before any request: nothing was uploaded).
        PushToHubError: the Hub could not be reached or refused the request; nothing local
            was changed, and no commit was made.
    """
    _check_objects(model, processor)
    _check_repo_id(repo_id)
    extra_files = _check_extra_files(extra_files)
    if model_card is None:
        model_card = default_model_card(model, repo_id)
    _check_model_card(model_card)

    api = HfApi(endpoint=endpoint, token=token, library_name="hf_pcme")
    with tempfile.TemporaryDirectory(prefix="hf_pcme_push_") as folder:
        operations = _save_folder(model, processor, model_card, extra_files, Path(folder))
        return _commit(api, repo_id, operations, commit_message=commit_message, private=private, revision=revision)


def _commit(
    api: HfApi, repo_id: str, operations: list[CommitOperationAdd], *, commit_message: str, private: bool,
    revision: str | None,
) -> str:
    """Create the repository (and branch) if missing and make one commit; return its URL or raise PushToHubError."""
    repo_created = False
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        repo_created = True
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        # Not upload_folder: with hf_xet installed it streams through a pipeline that may split
        # the upload into several commits; create_commit is one commit by construction.
        commit = api.create_commit(repo_id, operations=operations, commit_message=commit_message, revision=revision)
    except _NETWORK_ERRORS as err:
        where = "the repository exists but no commit was made" if repo_created else "nothing was uploaded"
        raise PushToHubError(
            f"Pushing to {repo_id!r} on {api.endpoint} failed ({where}): {err}\n"
            "Nothing local was changed or lost: the model, the processor and the files in `extra_files` "
            "are untouched. Check the token, `repo_id` and the connection (and that HF_HUB_OFFLINE is not "
            "set), then call push_to_hub again."
        ) from err
    return str(commit.commit_url)


def default_model_card(model: PreTrainedModel, repo_id: str) -> str:
    """A short ``README.md``: Hub metadata, what the model is, and how to load it."""
    config = model.config
    metadata = ModelCardData(
        library_name="transformers",
        tags=["pcme", "cross-modal-retrieval", "probabilistic-embeddings", "custom_code"],
    )
    details = ", ".join(
        f"{name}={getattr(config, name)!r}"
        for name in ("head_type", "loss_type", "embed_dim", "num_samples")
        if hasattr(config, name)
    )
    return (
        f"---\n{metadata.to_yaml()}\n---\n\n"
        f"# {repo_id.split('/')[-1]}\n\n"
        "Probabilistic cross-modal embedding model (PCME, Chun et al., CVPR 2021) for image-text retrieval: "
        "images and captions are embedded as Gaussians and matched by a match probability.\n\n"
        f"Configuration: {details}.\n\n"
        "```python\n"
        "from transformers import AutoModel, AutoProcessor\n\n"
        f'model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)\n'
        f'processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)\n'
        "```\n"
    )


def _check_objects(model: PreTrainedModel, processor: ProcessorMixin | None) -> None:
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"model must be a transformers PreTrainedModel (e.g. PCMEModel), got {type(model).__name__}; "
            "unwrap a DDP / accelerate / compiled model first (accelerator.unwrap_model(model))."
        )
    if processor is not None and not isinstance(processor, ProcessorMixin):
        raise ValueError(
            f"processor must be a transformers processor (e.g. PCMEProcessor) or None, got {type(processor).__name__}."
        )


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not _REPO_ID_FORM.match(repo_id):
        raise ValueError(
            f"repo_id must look like 'namespace/name' (your user or organisation, a slash, the repository "
            f"name), e.g. 'my-user/pcme-coco'; got {repo_id!r}."
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id {repo_id!r} is not a valid Hub repository id: {err}") from err


def _check_model_card(model_card: str) -> None:
    # The Hub refuses a README.md whose YAML front matter does not parse, but only after the
    # repository was created: check it here, before any request. (ModelCard logs a warning for a
    # card without front matter, hence the guard.)
    if not isinstance(model_card, str):
        raise ValueError(f"model_card must be the text of README.md (a str) or None; got {type(model_card)}.")
    if not re.match(r"\s*---", model_card):
        return
    try:
        ModelCard(model_card, ignore_metadata_errors=False)
    except (ValueError, yaml.YAMLError) as err:
        raise ValueError(f"model_card's YAML front matter (between '---' lines) does not parse: {err}") from err


def _check_extra_files(extra_files: Mapping[str, str | Path] | None) -> dict[str, Path]:
    checked: dict[str, Path] = {}
    for path_in_repo, local_path in (extra_files or {}).items():
        posix = PurePosixPath(path_in_repo)
        if posix.is_absolute() or ".." in posix.parts or str(posix) in ("", "."):
            raise ValueError(
                f"extra_files key {path_in_repo!r} must be a relative path inside the repository, e.g. 'results.json'."
            )
        if not Path(local_path).is_file():
            raise ValueError(f"extra_files[{path_in_repo!r}] = {str(local_path)!r} is not an existing file.")
        checked[str(posix)] = Path(local_path)
    return checked


def _save_folder(
    model: PreTrainedModel,
    processor: ProcessorMixin | None,
    model_card: str,
    extra_files: dict[str, Path],
    folder: Path,
) -> list[CommitOperationAdd]:
    """Write every file of the commit into ``folder``; return one add-operation per file."""
    # save_pretrained sets config.dtype / architectures / auto_map on the model it saves: save a
    # shallow copy (same parameters, no weight copy) that owns a deep copy of the config instead.
    model_view = copy.copy(model)
    model_view.config = copy.deepcopy(model.config)
    model_view.save_pretrained(folder)
    if processor is not None:
        # The processor's save writes auto_map into its tokenizer and image processor; it is small.
        copy.deepcopy(processor).save_pretrained(folder)
    saved = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}
    clashes = sorted(({"README.md"} | saved) & extra_files.keys())
    if clashes:
        raise ValueError(
            f"extra_files would overwrite files written by the model, processor or model card: {clashes}; "
            "give them other paths in the repository."
        )
    (folder / "README.md").write_text(model_card, encoding="utf-8")
    operations = [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path))
        for path in sorted(saved | {"README.md"})
    ]
    operations += [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(local)) for path, local in sorted(extra_files.items())
    ]
    return operations


__all__ = ["DEFAULT_COMMIT_MESSAGE", "PushToHubError", "default_model_card", "push_to_hub"]
