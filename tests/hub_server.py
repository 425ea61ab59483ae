"""The smallest local Hugging Face Hub that the real `huggingface_hub` client can push to and load from.

Served on 127.0.0.1, as the installed huggingface_hub calls it (`hf_api.py`, `_commit_api.py`, `file_download.py`):
whoami, repo creation (409 when it exists), YAML validation, model info and tree, branches, preupload (every file
"regular", with the oid of the file already there, so unchanged files are not sent again), commits (NDJSON, base64
files) and `HEAD|GET /{repo_id}/resolve/{rev}/{path}` (X-Repo-Commit, ETag, Content-Length). Errors carry the
`X-Error-Code` and `X-Error-Message` the client turns into exceptions: 401 for an unknown token or a write without
one, 403 for a write to another namespace. Anything else (LFS, Xet, deletions, PRs) is a 404 recorded in
`LocalHub.unhandled`. A new process points at it with `client_environment(...)` (`HF_ENDPOINT` and the cache and
token paths); this process with `HfApi(endpoint=server.url)` or `patch_client_in_process`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

FAKE_USER = "user"
FAKE_TOKEN = "hf_local_test_token"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
_REPO_API = re.compile(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree|branch|preupload|commit)/([^/]+))?")
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


class HubError(Exception):
    """An error answer: `HubError(status, message[, X-Error-Code])`; the client maps the code to an exception."""


class Commit(NamedTuple):
    """A commit: its id, title, parent id and the whole file tree after it (path -> content)."""

    oid: str
    title: str
    parent: str | None
    files: dict[str, bytes]


def git_oid(content: bytes) -> str:
    """The git blob id of `content`: the oid and ETag of a regular file on the Hub."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class LocalHub:
    """The Hub's state and endpoints. Test helpers: `commits(repo_id)`, `file(repo_id, path)`, `repos`, `unhandled`."""

    def __init__(self):
        self.tokens = {FAKE_TOKEN: FAKE_USER}
        self.repos: dict[str, dict[str, str]] = {}  # repo id -> branch -> commit id
        self.objects: dict[str, Commit] = {}  # commit id -> commit
        self.unhandled: list[str] = []
        self.lock = threading.Lock()

    def resolve(self, repo_id: str, revision: str) -> Commit:
        """The commit of a branch or commit id of `repo_id` (404 `RepoNotFound` or `RevisionNotFound` otherwise)."""
        if repo_id not in self.repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if (oid := self.repos[repo_id].get(revision, revision)) not in self.objects:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.objects[oid]

    def commits(self, repo_id: str, revision: str = "main") -> list[Commit]:
        """The history of `revision`, newest first (the repo's "initial commit" last)."""
        history = [self.resolve(repo_id, revision)]
        while history[-1].parent is not None:
            history.append(self.objects[history[-1].parent])
        return history

    def file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """The content of `path` at `revision`."""
        return self.resolve(repo_id, revision).files[path]

    def add_commit(self, repo_id: str, branch: str, title: str, files: dict[str, bytes]) -> Commit:
        """Commit the tree `files` on top of `branch` and move the branch to it."""
        parent = self.repos[repo_id].get(branch)
        oid = hashlib.sha1(f"{repo_id}{parent}{title}{len(self.objects)}{sorted(files.items())}".encode()).hexdigest()
        self.objects[oid] = Commit(oid, title, parent, files)
        self.repos[repo_id][branch] = oid
        return self.objects[oid]

    def user(self, headers: Any, write_to: str | None = None) -> str | None:
        """The user of the bearer token (`None`: no token); 401 for an unknown token. To write to the repo `write_to`:
        401 without a token, 403 for a token of another namespace."""
        token = (headers.get("Authorization") or "").removeprefix("Bearer ")
        if token and token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        if write_to is not None and not token:
            raise HubError(401, "You must be authenticated to write to the Hub: no token was sent.")
        if write_to is not None and self.tokens[token] != write_to.split("/")[0]:
            raise HubError(403, f"You don't have the rights to write to the {write_to.split('/')[0]!r} namespace.")
        return self.tokens.get(token)

    def handle(self, method: str, path: str, headers: Any, body: bytes, base_url: str) -> tuple[int, dict, Any]:
        """Answer one request: (status, headers, JSON payload or raw bytes)."""
        if (method, path) == ("GET", "/api/whoami-v2"):
            if (user := self.user(headers)) is None:
                raise HubError(401, "No token was sent.")
            return 200, {}, {"type": "user", "name": user, "auth": {"accessToken": {"role": "write"}}}
        if (method, path) == ("POST", "/api/validate-yaml"):
            return 200, {}, {"errors": [], "warnings": []}
        if (method, path) == ("POST", "/api/repos/create"):
            payload = json.loads(body)
            repo_id = f"{payload.get('organization') or self.user(headers)}/{payload['name']}"
            answer = {"url": f"{base_url}/{repo_id}", "name": repo_id}
            self.user(headers, write_to=repo_id)
            if repo_id in self.repos:
                return 409, {}, {"error": "You already created this model repo", **answer}
            self.repos[repo_id] = {}
            self.add_commit(repo_id, "main", "initial commit", {".gitattributes": GITATTRIBUTES})
            return 200, {}, answer
        if match := _REPO_API.fullmatch(path):
            repo_id, action, revision = match.group(1), match.group(2), unquote(match.group(3) or "main")
            self.user(headers, write_to=repo_id if method == "POST" else None)
            return self.repo_api(f"{method} {action}", repo_id, revision, body, base_url)
        if method in ("GET", "HEAD") and (match := _RESOLVE.fullmatch(path)):
            self.user(headers)
            commit = self.resolve(match.group(1), unquote(match.group(2)))
            if (content := commit.files.get(unquote(match.group(3)))) is None:
                raise HubError(404, "Entry not found", "EntryNotFound")
            return 200, {"X-Repo-Commit": commit.oid, "ETag": f'"{git_oid(content)}"'}, content
        self.unhandled.append(f"{method} {path}")
        raise HubError(404, f"Not served by the local test Hub: {method} {path}")

    def repo_api(self, request: str, repo_id: str, revision: str, body: bytes, base_url: str) -> tuple[int, dict, Any]:
        """The `/api/models/{repo_id}[/{action}/{revision}]` endpoints; `request` is `"METHOD action"`."""
        if request in ("GET None", "GET revision"):
            commit = self.resolve(repo_id, revision)
            return 200, {}, {"id": repo_id, "sha": commit.oid, "siblings": [{"rfilename": p} for p in commit.files]}
        if request == "GET tree":
            files = self.resolve(repo_id, revision).files
            return 200, {}, [{"type": "file", "path": p, "oid": git_oid(c), "size": len(c)} for p, c in files.items()]
        if request == "POST branch":
            start = self.resolve(repo_id, json.loads(body or b"{}").get("startingPoint") or "main")
            if revision in self.repos[repo_id]:
                raise HubError(409, f"Branch {revision} already exists")
            self.repos[repo_id][revision] = start.oid
            return 200, {}, {}
        if request == "POST preupload":
            files = self.resolve(repo_id, revision).files
            answers = []
            for item in json.loads(body)["files"]:
                oid = git_oid(files[item["path"]]) if item["path"] in files else None
                answers.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
            return 200, {}, {"files": answers}
        if request == "POST commit":
            header, *operations = [json.loads(line) for line in body.splitlines() if line.strip()]
            files = dict(self.resolve(repo_id, revision).files)
            for operation in operations:
                if operation["key"] != "file":
                    raise HubError(400, f"This local test Hub takes regular files only, not {operation['key']!r}.")
                files[operation["value"]["path"]] = base64.b64decode(operation["value"]["content"])
            commit = self.add_commit(repo_id, revision, header["value"]["summary"], files)
            url = f"{base_url}/{repo_id}/commit/{commit.oid}"
            return 200, {}, {"commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None}
        self.unhandled.append(f"{request} {repo_id} {revision}")
        raise HubError(404, f"Not served by the local test Hub: {request} on {repo_id}")


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 (keep-alive) transport for `LocalHub.handle`; silent (a server bug prints its traceback)."""

    protocol_version = "HTTP/1.1"
    server: HubServer

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            hub, path = self.server.hub, urlsplit(self.path).path
            with hub.lock:
                status, headers, payload = hub.handle(self.command, path, self.headers, body, self.server.url)
        except HubError as error:
            status, message, *code = error.args
            payload, headers = {"error": message}, {"X-Error-Message": message, **dict(zip(["X-Error-Code"], code))}
        if not isinstance(payload, bytes):
            payload, headers = json.dumps(payload).encode(), {"Content-Type": "application/json", **headers}
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class HubServer(ThreadingHTTPServer):
    """Serves a `LocalHub` (`.hub`) on 127.0.0.1 at a free port, from a daemon thread, for at most `max_lifetime_s`.
    A context manager; `url` is the endpoint: `HfApi(endpoint=server.url)`, `HF_ENDPOINT=<url>`."""

    daemon_threads = True

    def __init__(self, max_lifetime_s: float = 600.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = LocalHub()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._deadline = threading.Timer(max_lifetime_s, self.shutdown)

    def __enter__(self) -> HubServer:
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._deadline.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._deadline.cancel()
        self.shutdown()
        self.server_close()


def client_environment(endpoint: str, home: Path, token: str | None = FAKE_TOKEN) -> dict[str, str | None]:
    """Environment variables (`None`: unset) that point a new huggingface_hub / transformers process at `endpoint`:
    caches and token file under `home`, `token` as `HF_TOKEN` (`None`: no token at all), telemetry off."""
    return {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_TOKEN": token,
        "HUGGING_FACE_HUB_TOKEN": None,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",  # wins over TRANSFORMERS_OFFLINE
        "no_proxy": "127.0.0.1,localhost",  # wins over NO_PROXY
    }


def patch_client_in_process(monkeypatch: Any, endpoint: str, home: Path) -> None:
    """Point the `HfApi()`s made from now on in this process at `endpoint`, with no token (the
    `huggingface_hub.constants` read when an `HfApi` is made or a request sent); subprocesses started afterwards get
    `client_environment(endpoint, home, token=None)`."""
    from huggingface_hub import close_session, constants

    for name, value in client_environment(endpoint, home, token=None).items():
        monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))  # never read a real token
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    close_session()  # the next HTTP session honours NO_PROXY
