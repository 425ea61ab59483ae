"""An in-memory Hugging Face Hub on 127.0.0.1, speaking the part of the Hub API that `huggingface_hub` uses.

Tests push to it and load from it with the real clients (`huggingface_hub`, `transformers`), without network.
What it serves, read from huggingface_hub 2.4's client code (hf_api.py, _commit_api.py, lfs.py,
file_download.py, utils/_http.py):

- `GET  /api/whoami-v2`                                   `HfApi.whoami`
- `GET  /api/agent-harnesses`                             the client's user-agent agent detection (empty registry)
- `POST /api/repos/create`                                `create_repo` (model repos; 409 when it exists)
- `POST /api/validate-yaml`                               README.md front matter check of `upload_folder`
- `GET  /api/models/{repo_id}[/revision/{rev}]`           `model_info` / `repo_info` (`?blobs=true` for sizes)
- `GET  /api/models/{repo_id}/tree/{rev}[/{path}]`        `list_repo_tree` / `list_repo_files`, snapshot listing
- `GET  /api/models/{repo_id}/commits/{rev}`              `list_repo_commits`
- `POST /api/models/{repo_id}/branch/{branch}`            `create_branch`
- `POST /api/models/{repo_id}/preupload/{rev}`            upload mode ("regular" / "lfs") and remote oid per file
- `POST /{repo_id}.git/info/lfs/objects/batch`            LFS batch API (basic transfer)
- `PUT  /_lfs/{repo_id}/{sha256}?upload_token=...`        the LFS upload itself (a pre-signed URL: no auth header)
- `POST /_lfs/{repo_id}/verify`                           LFS verify action
- `POST /api/models/{repo_id}/commit/{rev}`               `create_commit`: the NDJSON payload (header, file,
                                                          lfsFile, deletedFile, deletedFolder)
- `HEAD|GET /{repo_id}/resolve/{rev}/{path}`              `hf_hub_download`, `snapshot_download`, `from_pretrained`

Errors carry the headers the client turns into its exceptions: `X-Error-Code: RepoNotFound | RevisionNotFound |
EntryNotFound` (404) and `X-Error-Message`. Write endpoints answer 401 to a missing or unknown token and 403 to a
token of another namespace. Anything else answers 404 and is recorded in `LocalHub.unhandled`, so a test can assert
that the client needed nothing this server lacks.

Not served: datasets and spaces, pull requests (`create_pr`), multipart LFS uploads (the client only asks for them
when the batch answer carries a `chunk_size`, which this server never sends), Xet storage (clients must run with
`HF_HUB_DISABLE_XET=1`: with `hf_xet` installed, `huggingface_hub` uploads through the Xet protocol instead of LFS).

Pointing a client at it
-----------------------
`huggingface_hub` reads `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_DISABLE_XET` and the token path once, at
import time, into `huggingface_hub.constants`; its module-level functions (`huggingface_hub.upload_folder`, ...)
and transformers' shared `HfApi` (`transformers.utils.hub.hf_api()`) keep the endpoint they were built with.
Setting the environment after import therefore does not redirect an already-imported client. Two ways work:

1. Robust, used for everything transformers does: run the client in a subprocess whose environment comes from
   `client_environment(...)`, exactly as a user configures a private Hub.
2. In-process, for code that builds a fresh `HfApi()` per call (as `tl_align_hf.push_checkpoint_to_hub` does):
   `patch_client_in_process(monkeypatch, ...)` patches the few `huggingface_hub.constants` that are read at call
   time (endpoint, Xet switch, token paths, cache). `Trainer.push_to_hub` in-process also needs transformers'
   shared client rebuilt: `monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)` (a private attribute,
   checked with transformers 5.24; the subprocess route does not depend on it).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

FAKE_USER = "user"
FAKE_TOKEN = "hf_local_test_token"
DEFAULT_BRANCH = "main"

# The Hub's default .gitattributes (abridged): these files, and any file over LFS_THRESHOLD_BYTES or with a NUL
# byte in its first 512 bytes, are stored with LFS. One list feeds both the preupload answer and .gitattributes.
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.model", "*.msgpack",
    "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar",
    "*.safetensors", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)  # fmt: skip
LFS_THRESHOLD_BYTES = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS)


def _now() -> str:
    """The current UTC time in the Hub's format, e.g. `2024-05-04T12:00:00.123Z`."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(content: bytes) -> str:
    """The git object id (SHA-1 of `blob <size>\\0<content>`) of a file's content."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def is_lfs_file(path: str, size: int, sample: bytes) -> bool:
    """Whether the Hub stores this file with LFS: a tracked pattern, a large file, or binary content."""
    name = path.rsplit("/", 1)[-1]
    tracked = any(fnmatch.fnmatch(name, pattern) for pattern in LFS_PATTERNS)
    return tracked or size > LFS_THRESHOLD_BYTES or b"\0" in sample[:512]


def front_matter(text: str) -> dict | None:
    """The YAML front matter of a README.md as a dict, `None` when there is none.

    Raises:
        ValueError: the front matter is not valid YAML or not a mapping.
    """
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        raise ValueError(f"Invalid YAML in the README.md front matter: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("The README.md front matter must be a YAML mapping.")
    return data


class HubError(Exception):
    """An HTTP error answer: status, optional `X-Error-Code` and a message (also sent as `X-Error-Message`)."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.commit = commit  # sent as X-Repo-Commit (the client caches "file does not exist at commit")


@dataclass(frozen=True)
class Blob:
    """One file's content and whether it is stored with LFS."""

    content: bytes
    lfs: bool

    @cached_property
    def sha256(self) -> str:
        """Hex SHA-256 of the content: the LFS oid."""
        return hashlib.sha256(self.content).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        """The git-lfs pointer file that git stores in place of an LFS file."""
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.content)}\n".encode()

    @cached_property
    def git_oid(self) -> str:
        """The git blob id of what git stores: the pointer for LFS files, the content otherwise."""
        return _git_blob_oid(self.pointer if self.lfs else self.content)

    @property
    def etag(self) -> str:
        """What `/resolve` sends as ETag: the SHA-256 for LFS files, the git blob id otherwise (as the Hub does)."""
        return self.sha256 if self.lfs else self.git_oid

    def tree_entry(self, path: str) -> dict[str, Any]:
        """This file as an entry of the tree API."""
        entry: dict[str, Any] = {"type": "file", "oid": self.git_oid, "size": len(self.content), "path": path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.content), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class Commit:
    """One commit: its id, parent, message, author, date and the whole file tree after it."""

    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, Blob]

    def as_api(self) -> dict[str, Any]:
        """This commit as an item of the commits API."""
        return {
            "id": self.oid,
            "title": self.title,
            "message": self.message,
            "authors": [{"user": self.author}],
            "date": self.date,
        }


@dataclass
class Repo:
    """A model repository: commits by id, branches (name -> commit id) and the LFS objects uploaded to it."""

    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)
    upload_tokens: dict[str, str] = field(default_factory=dict)  # one-time LFS upload token -> sha256

    @property
    def owner(self) -> str:
        """The namespace of the repository."""
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> Commit:
        """The commit a branch name, a full commit id or a commit id prefix (7+ characters) points to."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        matches = [oid for oid in self.commits if len(revision) >= 7 and oid.startswith(revision)]
        if len(matches) == 1:
            return self.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def history(self, revision: str) -> list[Commit]:
        """The commits reachable from `revision`, newest first."""
        commit: Commit | None = self.resolve(revision)
        commits = []
        while commit is not None:
            commits.append(commit)
            commit = self.commits[commit.parent] if commit.parent else None
        return commits

    def add_commit(self, branch: str, files: dict[str, Blob], summary: str, description: str, author: str) -> Commit:
        """Record a commit of the tree `files` on top of `branch` (created when missing) and move the branch."""
        parent = self.branches.get(branch)
        digest = hashlib.sha1(f"{parent}\n{summary}\n{len(self.commits)}\n{_now()}".encode())
        for path, blob in sorted(files.items()):
            digest.update(f"{path}:{blob.git_oid}\n".encode())
        commit = Commit(digest.hexdigest(), parent, summary, description, author, _now(), dict(files))
        self.commits[commit.oid] = commit
        self.branches[branch] = commit.oid
        return commit


@dataclass
class Request:
    """What a route handler needs from an HTTP request."""

    method: str
    params: dict[str, str]  # path parameters, unquoted
    query: dict[str, str]
    headers: Any  # email.message.Message: case-insensitive `.get`
    body: bytes
    base_url: str

    def json(self) -> Any:
        """The body parsed as JSON (400 when it is not)."""
        try:
            return json.loads(self.body or b"null")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from error

    def flag(self, name: str) -> bool:
        """Whether a boolean query parameter is set (`true`, `1`)."""
        return self.query.get(name, "").lower() in ("1", "true")

    @property
    def token(self) -> str | None:
        """The bearer token of the `Authorization` header, `None` when there is none."""
        authorization = self.headers.get("Authorization") or ""
        return authorization[len("Bearer ") :].strip() if authorization.startswith("Bearer ") else None


@dataclass
class Response:
    """A route handler's answer."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_json(cls, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        """A JSON answer."""
        body = json.dumps(payload).encode()
        return cls(status, body, {"Content-Type": "application/json", **(headers or {})})


class LocalHub:
    """The Hub's state (repositories and tokens) and the semantics of each endpoint, without the HTTP transport.

    Args:
        tokens: token -> user name. Every token may write to its user's namespace. Defaults to
            `{FAKE_TOKEN: FAKE_USER}`.

    Test helpers: `file(repo_id, path)`, `commits(repo_id)`, `repos`, and the request log `requests` /
    `unhandled` (`"METHOD /path"` strings).
    """

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = dict(tokens) if tokens is not None else {FAKE_TOKEN: FAKE_USER}
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self.unhandled: list[str] = []
        self.lock = threading.RLock()

    # ----- test helpers -----------------------------------------------------------------------------------------

    def file(self, repo_id: str, path: str, revision: str = DEFAULT_BRANCH) -> bytes:
        """The content of `path` in `repo_id` at `revision`."""
        with self.lock:
            return self.repos[repo_id].resolve(revision).files[path].content

    def commits(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> list[Commit]:
        """The history of `repo_id` at `revision`, newest first (the repo's creation commit last)."""
        with self.lock:
            return self.repos[repo_id].history(revision)

    # ----- auth -------------------------------------------------------------------------------------------------

    def user(self, request: Request) -> str | None:
        """The user the request authenticates as; 401 for a token this Hub does not know."""
        token = request.token
        if token is None:
            return None
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def writer(self, request: Request, namespace: str) -> str:
        """The user of a write request to `namespace`: 401 without a valid token, 403 for another namespace."""
        user = self.user(request)
        if user is None:
            raise HubError(401, "You must be authenticated to write to the Hub: no token was sent.")
        if user != namespace:
            raise HubError(403, f"You don't have the rights to write to the '{namespace}' namespace.")
        return user

    def repo(self, request: Request, *, write: bool = False) -> Repo:
        """The repository of the request's `repo` path parameter, checking read or write access."""
        repo_id = request.params["repo"]
        user = self.writer(request, repo_id.split("/")[0]) if write else self.user(request)
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    # ----- account and repositories -----------------------------------------------------------------------------

    def whoami(self, request: Request) -> Response:
        """`GET /api/whoami-v2`."""
        user = self.user(request)
        if user is None:
            raise HubError(401, "Invalid username or password.")
        access_token = {"displayName": "local-test-token", "role": "write"}
        return Response.of_json(
            {
                "type": "user",
                "id": f"id-{user}",
                "name": user,
                "fullname": user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": access_token},
            }
        )

    def agent_harnesses(self, request: Request) -> Response:
        """`GET /api/agent-harnesses`: the registry the client reads to name AI agents in its user agent (empty)."""
        return Response.of_json({"standardEnvVars": [], "harnesses": {}})

    def create_repo(self, request: Request) -> Response:
        """`POST /api/repos/create` with `{"name", "organization", "visibility"|"private", "type"}`."""
        payload = request.json() or {}
        if payload.get("type", "model") != "model":
            raise HubError(400, "This local Hub only serves model repositories.")
        user = self.user(request)
        namespace = payload.get("organization") or user
        if namespace is None:
            raise HubError(401, "You must be authenticated to create a repository: no token was sent.")
        self.writer(request, namespace)
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{request.base_url}/{repo_id}"
        if repo_id in self.repos:
            return Response.of_json({"error": "You already created this model repo", "url": url}, status=409)
        private = payload.get("visibility", "private" if payload.get("private") else "public") != "public"
        repo = self.repos[repo_id] = Repo(repo_id, private=private, created_at=_now())
        gitattributes = {".gitattributes": Blob(GITATTRIBUTES.encode(), lfs=False)}
        repo.add_commit(DEFAULT_BRANCH, gitattributes, "initial commit", "", author=namespace)
        return Response.of_json({"url": url, "name": repo_id, "id": f"id-{repo_id}"})

    def create_branch(self, request: Request) -> Response:
        """`POST /api/models/{repo_id}/branch/{branch}` with an optional `{"startingPoint": revision}`."""
        repo = self.repo(request, write=True)
        branch = request.params["branch"]
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        start = (request.json() or {}).get("startingPoint") or DEFAULT_BRANCH
        repo.branches[branch] = repo.resolve(start).oid
        return Response.of_json({})

    # ----- reading ----------------------------------------------------------------------------------------------

    def model_info(self, request: Request) -> Response:
        """`GET /api/models/{repo_id}[/revision/{rev}]`: sha, siblings, tags and card data from README.md."""
        repo = self.repo(request)
        commit = repo.resolve(request.params.get("rev") or DEFAULT_BRANCH)
        card = self._card_data(commit)
        info = {
            "_id": f"id-{repo.repo_id}",
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.owner,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": self._tags(commit, card),
            "library_name": card.get("library_name"),
            "pipeline_tag": card.get("pipeline_tag"),
            "siblings": [
                self._sibling(path, blob, request.flag("blobs")) for path, blob in sorted(commit.files.items())
            ],
            "spaces": [],
            "usedStorage": sum(len(blob.content) for blob in commit.files.values()),
        }
        if "README.md" in commit.files:
            info["cardData"] = card
        if "model-index" in card:
            info["model-index"] = card["model-index"]
        if (config := self._model_config(commit)) is not None:
            info["config"] = config
        return Response.of_json(info)

    @staticmethod
    def _card_data(commit: Commit) -> dict:
        """The README.md front matter at `commit` (empty when missing or invalid)."""
        readme = commit.files.get("README.md")
        try:
            return (front_matter(readme.content.decode()) if readme else None) or {}
        except ValueError:
            return {}

    @staticmethod
    def _tags(commit: Commit, card: dict) -> list[str]:
        """The repo tags the Hub derives: the card's tags, its library, and `safetensors` when there are weights."""
        tags = list(card.get("tags") or [])
        if card.get("library_name"):
            tags.append(card["library_name"])
        if any(path.endswith(".safetensors") for path in commit.files):
            tags.append("safetensors")
        return list(dict.fromkeys(tags))

    @staticmethod
    def _model_config(commit: Commit) -> dict | None:
        """The part of config.json the Hub shows in model info (architectures, model_type)."""
        blob = commit.files.get("config.json")
        try:
            config = json.loads(blob.content) if blob else None
        except json.JSONDecodeError:
            return None
        if not isinstance(config, dict):
            return None
        return {key: config[key] for key in ("architectures", "model_type") if key in config}

    @staticmethod
    def _sibling(path: str, blob: Blob, with_blobs: bool) -> dict[str, Any]:
        """A `siblings` entry of model info; with sizes, blob ids and LFS data for `?blobs=true`."""
        if not with_blobs:
            return {"rfilename": path}
        sibling: dict[str, Any] = {"rfilename": path, "size": len(blob.content), "blobId": blob.git_oid}
        if blob.lfs:
            sibling["lfs"] = {"size": len(blob.content), "sha256": blob.sha256, "pointerSize": len(blob.pointer)}
        return sibling

    def tree(self, request: Request) -> Response:
        """`GET /api/models/{repo_id}/tree/{rev}[/{path}]?recursive=&expand=`: files and folders under `path`."""
        repo = self.repo(request)
        commit = repo.resolve(request.params["rev"])
        folder = (request.params.get("path") or "").strip("/")
        prefix = f"{folder}/" if folder else ""
        paths = [path for path in commit.files if path.startswith(prefix)]
        if folder and not paths:
            raise HubError(404, f"{folder} does not exist on {request.params['rev']}", "EntryNotFound", commit.oid)
        entries = self._tree_entries(commit, paths, prefix, request.flag("recursive"))
        if request.flag("expand"):
            for entry in entries:
                entry["lastCommit"] = self._last_commit(repo, commit, entry["path"])
        return Response.of_json(entries)

    @staticmethod
    def _tree_entries(commit: Commit, paths: list[str], prefix: str, recursive: bool) -> list[dict[str, Any]]:
        """Tree entries for `paths` (all under `prefix`): folders first, then files, each sorted by path."""
        folders: set[str] = set()
        files = []
        for path in sorted(paths):
            parts = path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            folders.update(prefix + "/".join(parts[: index + 1]) for index in range(min(depth, len(parts) - 1)))
            if recursive or len(parts) == 1:
                files.append(commit.files[path].tree_entry(path))
        folder_entries = [
            {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder}
            for folder in sorted(folders)
        ]
        return folder_entries + files

    @staticmethod
    def _last_commit(repo: Repo, head: Commit, path: str) -> dict[str, str]:
        """The newest commit reachable from `head` that changed `path` (a file, or anything under a folder)."""

        def snapshot(commit: Commit) -> dict[str, str]:
            return {p: b.git_oid for p, b in commit.files.items() if p == path or p.startswith(f"{path}/")}

        last = head
        for commit in repo.history(head.oid)[1:]:
            if snapshot(commit) != snapshot(last):
                break
            last = commit
        return {"id": last.oid, "title": last.title, "date": last.date}

    def commits_list(self, request: Request) -> Response:
        """`GET /api/models/{repo_id}/commits/{rev}`: the history, newest first, in one page."""
        repo = self.repo(request)
        return Response.of_json([commit.as_api() for commit in repo.history(request.params["rev"])])

    def resolve(self, request: Request) -> Response:
        """`HEAD|GET /{repo_id}/resolve/{rev}/{path}` with the headers `hf_hub_download` needs."""
        repo = self.repo(request)
        commit = repo.resolve(request.params["rev"])
        blob = commit.files.get(request.params["path"])
        if blob is None:
            raise HubError(404, "Entry not found", code="EntryNotFound", commit=commit.oid)
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.content))})
        return self._ranged(blob.content, request.headers.get("Range"), headers)

    @staticmethod
    def _ranged(content: bytes, range_header: str | None, headers: dict[str, str]) -> Response:
        """The whole content (200), or the `bytes=start-[end]` part of it (206) as resumed downloads ask."""
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header or "")
        if match is None:
            return Response(200, content, headers)
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) else len(content) - 1
        if start >= len(content):
            return Response(416, b"", {**headers, "Content-Range": f"bytes */{len(content)}"})
        part = content[start : end + 1]
        return Response(
            206, part, {**headers, "Content-Range": f"bytes {start}-{start + len(part) - 1}/{len(content)}"}
        )

    # ----- writing ----------------------------------------------------------------------------------------------

    def validate_yaml(self, request: Request) -> Response:
        """`POST /api/validate-yaml` with `{"content", "repoType"}`: 400 with `errors` for bad front matter."""
        content = (request.json() or {}).get("content", "")
        try:
            front_matter(content)
        except ValueError as error:
            return Response.of_json({"errors": [{"message": str(error)}], "warnings": []}, status=400)
        return Response.of_json({"errors": [], "warnings": []})

    def preupload(self, request: Request) -> Response:
        """`POST /api/models/{repo_id}/preupload/{rev}`: upload mode of each file and the oid already there."""
        repo = self.repo(request, write=True)
        self._refuse_pull_requests(request)
        commit = repo.resolve(request.params["rev"])
        answers = []
        for item in (request.json() or {}).get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            lfs = is_lfs_file(item["path"], int(item["size"]), sample)
            existing = commit.files.get(item["path"])
            oid = None if existing is None else (existing.sha256 if lfs else existing.git_oid)
            answers.append(
                {"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return Response.of_json({"files": answers, "commitOid": commit.oid})

    def lfs_batch(self, request: Request) -> Response:
        """`POST /{repo_id}.git/info/lfs/objects/batch`: basic-transfer upload actions for objects not yet stored."""
        repo = self.repo(request, write=True)
        payload = request.json() or {}
        if payload.get("operation") != "upload":
            raise HubError(400, "This local Hub serves LFS uploads only; download through /resolve.")
        objects = [self._lfs_action(repo, item, request.base_url) for item in payload.get("objects", [])]
        return Response.of_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    @staticmethod
    def _lfs_action(repo: Repo, item: dict, base_url: str) -> dict[str, Any]:
        """The batch answer for one object: no `actions` when it is already stored, else upload and verify URLs."""
        answer = {"oid": item["oid"], "size": item["size"], "authenticated": True}
        if item["oid"] in repo.lfs_objects:
            return answer
        upload_token = secrets.token_hex(16)
        repo.upload_tokens[upload_token] = item["oid"]
        upload = {"href": f"{base_url}/_lfs/{repo.repo_id}/{item['oid']}?upload_token={upload_token}"}
        verify = {"href": f"{base_url}/_lfs/{repo.repo_id}/verify"}
        return {**answer, "actions": {"upload": upload, "verify": verify}}

    def lfs_upload(self, request: Request) -> Response:
        """`PUT /_lfs/{repo_id}/{sha256}?upload_token=`: store an object; the token stands in for a signed URL."""
        repo = self.repos.get(request.params["repo"])
        oid = request.params["oid"]
        if repo is None or repo.upload_tokens.pop(request.query.get("upload_token", ""), None) != oid:
            raise HubError(403, "Invalid or expired upload URL.")
        if hashlib.sha256(request.body).hexdigest() != oid:
            raise HubError(400, f"The uploaded content does not hash to {oid}.")
        repo.lfs_objects[oid] = request.body
        return Response(200)

    def lfs_verify(self, request: Request) -> Response:
        """`POST /_lfs/{repo_id}/verify` with `{"oid", "size"}`: 404 unless that object was stored."""
        repo = self.repo(request, write=True)
        payload = request.json() or {}
        stored = repo.lfs_objects.get(payload.get("oid", ""))
        if stored is None or len(stored) != payload.get("size"):
            raise HubError(404, f"LFS object {payload.get('oid')} of size {payload.get('size')} was not uploaded.")
        return Response.of_json({"success": True})

    def commit(self, request: Request) -> Response:
        """`POST /api/models/{repo_id}/commit/{branch}`: apply an NDJSON list of operations as one commit."""
        repo = self.repo(request, write=True)
        self._refuse_pull_requests(request)
        branch = request.params["rev"]
        if branch not in repo.branches:
            raise HubError(404, f"Branch {branch} not found: commits go to an existing branch.", "RevisionNotFound")
        lines = [json.loads(line) for line in request.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a 'header' line.")
        header = lines[0]["value"]
        head = repo.resolve(branch)
        if header.get("parentCommit") and not head.oid.startswith(header["parentCommit"]):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines[1:]:
            self._apply_operation(repo, files, line["key"], line["value"])
        author = self.user(request) or repo.owner
        commit = repo.add_commit(branch, files, header["summary"], header.get("description", ""), author)
        commit_url = f"{request.base_url}/{repo.repo_id}/commit/{commit.oid}"
        return Response.of_json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": commit_url,
                "pullRequestUrl": None,
                "hookOutput": "",
            }
        )

    @staticmethod
    def _apply_operation(repo: Repo, files: dict[str, Blob], key: str, value: dict) -> None:
        """Apply one commit operation (`file`, `lfsFile`, `deletedFile`, `deletedFolder`) to the tree `files`."""
        path = value["path"]
        if key == "file":
            files[path] = Blob(base64.b64decode(value["content"]), lfs=False)
        elif key == "lfsFile":
            content = repo.lfs_objects.get(value["oid"])
            if content is None:
                raise HubError(422, f"LFS file {path} (oid {value['oid']}) was never uploaded.")
            files[path] = Blob(content, lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
        elif key == "deletedFolder":
            for existing in [p for p in files if p.startswith(path.rstrip("/") + "/")]:
                del files[existing]
        else:
            raise HubError(400, f"Unknown commit operation {key!r}.")

    @staticmethod
    def _refuse_pull_requests(request: Request) -> None:
        """400 for `create_pr`: this local Hub has no pull requests."""
        if request.flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by this local test Hub.")


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API_REPO = rf"/api/models/{_REPO}"
# (methods, path pattern matched against the still-quoted path, LocalHub method)
ROUTES: list[tuple[tuple[str, ...], re.Pattern, Callable[[LocalHub, Request], Response]]] = [
    (("GET",), re.compile(r"/api/whoami-v2"), LocalHub.whoami),
    (("GET",), re.compile(r"/api/agent-harnesses"), LocalHub.agent_harnesses),
    (("POST",), re.compile(r"/api/repos/create"), LocalHub.create_repo),
    (("POST",), re.compile(r"/api/validate-yaml"), LocalHub.validate_yaml),
    (("GET",), re.compile(rf"{_API_REPO}(?:/revision/(?P<rev>[^/]+))?"), LocalHub.model_info),
    (("GET",), re.compile(rf"{_API_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"), LocalHub.tree),
    (("GET",), re.compile(rf"{_API_REPO}/commits/(?P<rev>[^/]+)"), LocalHub.commits_list),
    (("POST",), re.compile(rf"{_API_REPO}/branch/(?P<branch>[^/]+)"), LocalHub.create_branch),
    (("POST",), re.compile(rf"{_API_REPO}/preupload/(?P<rev>[^/]+)"), LocalHub.preupload),
    (("POST",), re.compile(rf"{_API_REPO}/commit/(?P<rev>[^/]+)"), LocalHub.commit),
    (("POST",), re.compile(rf"/{_REPO}\.git/info/lfs/objects/batch"), LocalHub.lfs_batch),
    (("PUT",), re.compile(rf"/_lfs/{_REPO}/(?P<oid>[0-9a-f]{{64}})"), LocalHub.lfs_upload),
    (("POST",), re.compile(rf"/_lfs/{_REPO}/verify"), LocalHub.lfs_verify),
    (("GET", "HEAD"), re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), LocalHub.resolve),
]


class _HubHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that carries the `LocalHub` it serves."""

    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, hub: LocalHub):
        super().__init__(("127.0.0.1", 0), _HubRequestHandler)
        self.hub = hub

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:<port>`."""
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubRequestHandler(BaseHTTPRequestHandler):
    """Routes each request to a `LocalHub` method and writes its `Response` (HTTP/1.1, keep-alive)."""

    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds an idle keep-alive connection is kept
    server: _HubHTTPServer

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: requests are recorded in `LocalHub.requests` instead."""

    def _dispatch(self) -> None:
        """Read the request, find its route, run it under the Hub's lock and send the answer."""
        hub = self.server.hub
        url = urlsplit(self.path)
        body = self._read_body()
        with hub.lock:
            hub.requests.append(f"{self.command} {url.path}")
        try:
            response = self._route(hub, url, body)
        except HubError as error:
            response = self._error_response(error)
        except Exception as error:  # report server bugs to the client as a 500, never hang
            response = Response.of_json({"error": f"{type(error).__name__}: {error}"}, status=500)
        self._send(response)

    def _route(self, hub: LocalHub, url: Any, body: bytes) -> Response:
        """Run the route whose method and pattern match; 404 (recorded in `hub.unhandled`) when none does."""
        for methods, pattern, handler in ROUTES:
            match = pattern.fullmatch(url.path)
            if match is None or self.command not in methods:
                continue
            params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
            query = {key: values[-1] for key, values in parse_qs(url.query).items()}
            request = Request(self.command, params, query, self.headers, body, self.server.base_url)
            with hub.lock:
                return handler(hub, request)
        with hub.lock:
            hub.unhandled.append(f"{self.command} {url.path}")
        raise HubError(404, f"Not served by the local test Hub: {self.command} {url.path}")

    def _read_body(self) -> bytes:
        """The request body, from `Content-Length` or chunked transfer encoding."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    @staticmethod
    def _error_response(error: HubError) -> Response:
        """The JSON error answer, with the headers `hf_raise_for_status` reads."""
        headers = {"X-Error-Message": error.message}
        if error.code:
            headers["X-Error-Code"] = error.code
        if error.commit:
            headers["X-Repo-Commit"] = error.commit
        return Response.of_json({"error": error.message}, status=error.status, headers=headers)

    def _send(self, response: Response) -> None:
        """Write status, headers (always with Content-Length) and, except for HEAD, the body."""
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)


class HubServer:
    """Serves a `LocalHub` on `127.0.0.1` at a free port from a daemon thread, for at most `max_lifetime_s`.

    Use as a context manager (or `start()` / `stop()`); `url` is the value for `HF_ENDPOINT`.

    Example:

    ```python
    with HubServer() as server:
        HfApi(endpoint=server.url, token=FAKE_TOKEN).whoami()["name"]  # "user"
    ```
    """

    def __init__(self, hub: LocalHub | None = None, max_lifetime_s: float = 600.0):
        self.hub = hub if hub is not None else LocalHub()
        self.max_lifetime_s = max_lifetime_s
        self._server: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._deadline: threading.Timer | None = None

    @property
    def url(self) -> str:
        """The endpoint URL, `http://127.0.0.1:<port>`."""
        if self._server is None:
            raise RuntimeError("The local Hub is not running: call start() first.")
        return self._server.base_url

    def start(self) -> HubServer:
        """Bind a free port and serve in the background; a timer stops the server after `max_lifetime_s`."""
        self._server = _HubHTTPServer(self.hub)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        self._deadline = threading.Timer(self.max_lifetime_s, self.stop)
        self._deadline.daemon = True
        self._deadline.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        server, self._server = self._server, None
        if self._deadline is not None and self._deadline is not threading.current_thread():
            self._deadline.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def client_environment(endpoint: str, home: Path, token: str | None = FAKE_TOKEN) -> dict[str, str | None]:
    """Environment variables that point a new `huggingface_hub` / `transformers` process at the local Hub.

    Values of `None` mean "unset". Caches and the token file live under `home`; `token=None` gives a client with
    no token at all.
    """
    return {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_TOKEN": token,
        "HUGGING_FACE_HUB_TOKEN": None,
        "HUGGINGFACE_CO_STAGING": None,
        "HF_HUB_DISABLE_XET": "1",  # this server speaks LFS, not Xet
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def patch_client_in_process(monkeypatch: Any, endpoint: str, home: Path) -> None:
    """Point this process's already-imported `huggingface_hub` at the local Hub, for code that makes a new
    `HfApi()` per call; also sets `client_environment(endpoint, home, token=None)` for subprocesses.

    Patched (all read at call time): `constants.ENDPOINT` and the download URL template, `HF_HUB_DISABLE_XET`,
    offline mode (off: the Hub is local) and telemetry (off), the token file paths (so no real token is ever read)
    and the cache. The shared HTTP session is closed so that the next one honours `NO_PROXY=127.0.0.1`. Not
    redirected: `HfApi` objects made before (the module-level `huggingface_hub.upload_folder` & co.,
    transformers' shared `hf_api()`).
    """
    from huggingface_hub import close_session, constants

    for name, value in client_environment(endpoint, home, token=None).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    patched = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_CACHE": str(home / "hub"),
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    close_session()
