"""A stand-in for the Hugging Face Hub HTTP API on 127.0.0.1, for push-to-hub tests without network.

It serves exactly the endpoints ``huggingface_hub`` 2.4 calls for ``create_repo``, ``create_branch``,
``create_commit`` (which ``transformers``' ``push_to_hub`` also uses) and the ``README.md`` lookup
``transformers`` does before pushing:

- ``POST /api/repos/create``                               -> 200 ``{"url": ...}``, 409 if it exists
- ``POST /api/validate-yaml``                              -> 200 (400 if the front matter is not YAML)
- ``POST /api/{type}s/{ns}/{name}/branch/{branch}``        -> 200, 409 if it exists
- ``POST /api/{type}s/{ns}/{name}/preupload/{revision}``   -> every file ``"uploadMode": "regular"``
- ``POST /api/{type}s/{ns}/{name}/commit/{revision}``      -> applies the NDJSON commit
- ``HEAD|GET /{ns}/{name}/resolve/{revision}/{path}``      -> the file, or 404 ``EntryNotFound``
- ``GET /api/agent-harnesses``                             -> an empty registry (huggingface_hub fetches it
  once per process, when telemetry is on, to name an AI agent in the user-agent header)

Answering "regular" to every preupload makes the client put each file inline (base64) in the
commit payload, so neither the LFS batch API nor the Xet (``hf_xet``) upload path is taken. Any
other request gets 501 and is recorded, so a test can assert that nothing unexpected was called.

Usage::

    with StandInHub() as hub:
        HfApi(endpoint=hub.url, token="hf_fake").create_repo("user/model")
        ...
        hub.commits[-1].files["config.json"]   # bytes

In a subprocess, set ``HF_ENDPOINT=hub.url`` (read when ``huggingface_hub`` is imported).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


@dataclass
class Commit:
    """One commit received by the stand-in."""

    repo_id: str
    revision: str
    summary: str
    description: str
    oid: str
    files: dict[str, bytes]  # the files added or replaced by this commit
    deleted: list[str] = field(default_factory=list)


@dataclass
class Repo:
    repo_type: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    heads: dict[str, str] = field(default_factory=lambda: {"main": "0" * 40})


class StandInHub:
    """In-memory Hub: ``repos`` (id -> :class:`Repo`), ``commits`` (in order), ``calls`` (``"METHOD /path"``)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.commits: list[Commit] = []
        self.calls: list[str] = []
        self.authorizations: list[str | None] = []
        self.unexpected: list[str] = []
        self.refusals: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> StandInHub:
        # A short poll interval makes stop() (which waits for the serving loop to notice) fast.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="stand-in-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> StandInHub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def refuse(self, action: str, status: int = 403) -> None:
        """Answer every later ``action`` request (``"create"``, ``"preupload"``, ``"commit"``, ``"branch"``,
        ``"validate-yaml"``, ``"resolve"``) with ``status``, as the Hub does for a token without write access."""
        self.refusals[action] = status

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at the head of ``revision``."""
        return dict(self.repos[repo_id].branches[revision])

    def endpoints_called(self) -> set[str]:
        """Calls with repository ids, revisions and file paths replaced by placeholders."""
        return {_endpoint_pattern(call) for call in self.calls}


# ---------------------------------------------------------------------------------------------
# Request handling


class _HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code


def _make_handler(hub: StandInHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so no keep-alive thread outlives stop().
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args) -> None:  # quiet test output
            pass

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def do_DELETE(self) -> None:
            self._dispatch("DELETE")

        def _dispatch(self, method: str) -> None:
            split = urlsplit(self.path)
            path, query = unquote(split.path), parse_qs(split.query)
            body = self._read_body()
            with hub._lock:
                hub.calls.append(f"{method} {path}")
                hub.authorizations.append(self.headers.get("Authorization"))
                try:
                    status, payload, headers = _route(hub, method, path, query, body, self._base_url())
                except _HubError as err:
                    status, payload = err.status, {"error": err.message}
                    headers = {"X-Error-Code": err.error_code} if err.error_code else {}
                    headers["X-Error-Message"] = err.message
            self._respond(method, status, payload, headers)

        def _base_url(self) -> str:
            host, port = self.server.server_address[:2]
            return f"http://{host}:{port}"

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _respond(self, method: str, status: int, payload: dict | bytes, headers: dict[str, str]) -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            if not isinstance(payload, bytes):
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)

    return Handler


def _route(hub: StandInHub, method: str, path: str, query: dict, body: bytes, base_url: str):
    parts = path.strip("/").split("/")
    repo_api = method == "POST" and len(parts) >= 6 and parts[0] == "api" and parts[1] in _REPO_TYPES
    resolve = method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve" and parts[0] not in _REPO_TYPES
    action = parts[4] if repo_api else "resolve" if resolve else parts[-1]
    if action in hub.refusals:
        raise _HubError(hub.refusals[action], f"The stand-in Hub was told to refuse {action!r} requests.")
    if method == "POST" and path == "/api/repos/create":
        return _create_repo(hub, json.loads(body), base_url)
    if method == "GET" and path == "/api/agent-harnesses":
        return 200, {"standardEnvVars": [], "harnesses": {}}, {}
    if method == "POST" and path == "/api/validate-yaml":
        return _validate_yaml(json.loads(body))
    if repo_api and action in ("preupload", "commit", "branch"):
        repo_id, rest = f"{parts[2]}/{parts[3]}", "/".join(parts[5:])
        repo = _get_repo(hub, repo_id, _REPO_TYPES[parts[1]])
        if action == "preupload":
            return _preupload(repo, rest, json.loads(body))
        if action == "commit":
            return _commit(hub, repo_id, repo, rest, query, body, base_url)
        return _create_branch(repo, rest, json.loads(body or b"{}"))
    if resolve:
        repo_id, revision, file_path = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
        return _resolve(_get_repo(hub, repo_id, "model"), repo_id, revision, file_path)
    hub.unexpected.append(f"{method} {path}")
    raise _HubError(501, f"The stand-in Hub does not implement {method} {path}.")


def _get_repo(hub: StandInHub, repo_id: str, repo_type: str) -> Repo:
    repo = hub.repos.get(repo_id)
    if repo is None or repo.repo_type != repo_type:
        raise _HubError(404, f"Repository {repo_id} not found.", "RepoNotFound")
    return repo


def _create_repo(hub: StandInHub, payload: dict, base_url: str):
    repo_type = payload.get("type") or "model"
    repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    url = f"{base_url}/{prefix}{repo_id}"
    if repo_id in hub.repos:
        raise _HubError(409, "You already created this model repo")
    hub.repos[repo_id] = Repo(repo_type=repo_type, private=payload.get("visibility") == "private")
    return 200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}, {}


def _validate_yaml(payload: dict):
    content = payload.get("content", "")
    if content.startswith("---"):
        front_matter = content.split("---", 2)[1] if content.count("---") >= 2 else ""
        try:
            yaml.safe_load(front_matter)
        except yaml.YAMLError as err:
            return 400, {"errors": [{"message": str(err)}], "warnings": []}, {}
    return 200, {"errors": [], "warnings": []}, {}


def _check_revision(repo: Repo, revision: str) -> None:
    if revision not in repo.branches:
        raise _HubError(404, f"Revision {revision} not found.", "RevisionNotFound")


def _create_branch(repo: Repo, branch: str, payload: dict):
    if branch in repo.branches:
        raise _HubError(409, f"Branch {branch} already exists.")
    start = payload.get("startingPoint") or "main"
    _check_revision(repo, start)
    repo.branches[branch] = dict(repo.branches[start])
    repo.heads[branch] = repo.heads[start]
    return 200, {}, {}


def _preupload(repo: Repo, revision: str, payload: dict):
    _check_revision(repo, revision)
    files = [
        {"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
        for entry in payload["files"]
    ]
    return 200, {"files": files, "commitOid": repo.heads[revision]}, {}


def _commit(hub: StandInHub, repo_id: str, repo: Repo, revision: str, query: dict, body: bytes, base_url: str):
    if "create_pr" in query:
        raise _HubError(400, "The stand-in Hub does not support pull requests.")
    _check_revision(repo, revision)
    header, added, deleted = None, {}, []
    for line in body.splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        key, value = item["key"], item["value"]
        if key == "header":
            header = value
        elif key == "file":
            if value.get("encoding") != "base64":
                raise _HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {value['path']}.")
            added[value["path"]] = base64.b64decode(value["content"])
        elif key in ("deletedFile", "deletedFolder"):
            deleted.append(value["path"])
        else:
            raise _HubError(400, f"The stand-in Hub stores files inline only; got a {key!r} operation.")
    if header is None:
        raise _HubError(400, "Commit payload has no header line.")
    if "parentCommit" in header and header["parentCommit"] != repo.heads[revision]:
        raise _HubError(412, "Parent commit is not the head of the branch.")
    tree = repo.branches[revision]
    for path in deleted:
        for existing in [p for p in tree if p == path or p.startswith(path.rstrip("/") + "/")]:
            del tree[existing]
    tree.update(added)
    oid = hashlib.sha1(f"{repo_id}@{revision}#{len(hub.commits)}".encode()).hexdigest()
    repo.heads[revision] = oid
    hub.commits.append(
        Commit(repo_id, revision, header.get("summary", ""), header.get("description", ""), oid, added, deleted)
    )
    return 200, {"success": True, "commitOid": oid, "commitUrl": f"{base_url}/{repo_id}/commit/{oid}"}, {}


def _resolve(repo: Repo, repo_id: str, revision: str, file_path: str):
    _check_revision(repo, revision)
    content = repo.branches[revision].get(file_path)
    if content is None:
        raise _HubError(404, f"Entry {file_path} not found in {repo_id}.", "EntryNotFound")
    etag = f'"{hashlib.sha1(content).hexdigest()}"'
    return 200, content, {"ETag": etag, "X-Repo-Commit": repo.heads[revision]}


def _endpoint_pattern(call: str) -> str:
    method, path = call.split(" ", 1)
    parts = path.strip("/").split("/")
    if len(parts) >= 6 and parts[0] == "api" and parts[1] in _REPO_TYPES:
        return f"{method} /api/{parts[1]}/{{repo_id}}/{parts[4]}/{{revision}}"
    if len(parts) >= 5 and parts[2] == "resolve":
        return f"{method} /{{repo_id}}/resolve/{{revision}}/{{path}}"
    return call
