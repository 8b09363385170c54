"""A small in-memory stand-in for the Hugging Face Hub HTTP API (tests and offline demos).

It speaks the part of the API that `huggingface_hub` 2.x uses to create repositories and branches, upload
regular (non-LFS) files, read repository information and download files, which is enough for
`create_repo`, `create_branch`, `upload_folder`, `create_commit`, `ModelCard.push_to_hub`,
`hf_hub_download` and `from_pretrained("user/repo")`:

| request | route |
|---|---|
| create a repository | `POST /api/repos/create` |
| validate card metadata | `POST /api/validate-yaml` |
| agent registry (client telemetry) | `GET /api/agent-harnesses` (empty) |
| create a branch | `POST /api/models/{repo}/branch/{branch}` |
| upload modes | `POST /api/models/{repo}/preupload/{revision}` (always "regular") |
| commit | `POST /api/models/{repo}/commit/{revision}` (NDJSON: header, file (base64), deletedFile, deletedFolder) |
| repository info | `GET /api/models/{repo}` and `GET /api/models/{repo}/revision/{revision}` |
| refs, tree | `GET /api/models/{repo}/refs`, `GET /api/models/{repo}/tree/{revision}[/{path}]` |
| file download | `HEAD` / `GET /{repo}/resolve/{revision}/{path}` (ETag, X-Repo-Commit, Content-Length) |

What it does not do: LFS or Xet uploads (set `HF_HUB_DISABLE_XET=1` in the client; files are sent inline,
which the real Hub limits to small files), pull requests, tags, datasets and spaces, byte ranges (a `Range`
header is ignored and the whole file is sent, which clients handle). Every valid token may write to every
namespace. Errors carry the `X-Error-Code` header the client library maps to its exceptions
(`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`).

    python -m tests.fake_hub --port 8765      # from the repository root; serves until interrupted, prints the endpoint and token

    from tests.fake_hub import FakeHubServer
    with FakeHubServer() as server:                # random free port on 127.0.0.1
        ...  # in a process started with HF_ENDPOINT=server.url, HF_TOKEN=server.token, HF_HUB_DISABLE_XET=1
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

DEFAULT_TOKEN = "hf_fake_hub_token"
DEFAULT_BRANCH = "main"


class HubError(Exception):
    """An API error: HTTP status, the Hub's `X-Error-Code` (or None) and a message."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


# ============================================================================================ storage
def git_blob_sha1(content: bytes) -> str:
    """The git object id of a file (what the Hub reports as the ETag / oid of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class Commit:
    """An immutable snapshot: every file of the repository at this commit."""

    oid: str
    parent: str | None
    files: dict[str, bytes]
    summary: str
    created: float


@dataclass
class Repo:
    repo_id: str
    private: bool
    created: float
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """A branch name or a full commit oid -> the commit; unknown revisions raise RevisionNotFound."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def make_commit(parent: Commit | None, files: dict[str, bytes], summary: str) -> Commit:
    """A new commit whose oid hashes its parent, its files and its message (40 hex digits, like git)."""
    digest = hashlib.sha1()
    digest.update((parent.oid if parent else "root").encode())
    for path in sorted(files):
        digest.update(f"{path}\0{git_blob_sha1(files[path])}\n".encode())
    digest.update(summary.encode())
    digest.update(repr(time.time_ns()).encode())  # two identical commits still get distinct oids
    return Commit(digest.hexdigest(), parent.oid if parent else None, dict(files), summary, time.time())


def card_metadata(readme: bytes | None) -> dict | None:
    """The YAML block at the top of a README.md, parsed (None when there is none); bad YAML raises."""
    if readme is None:
        return None
    text = readme.decode("utf-8")
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        raise HubError(400, "README.md metadata block is not closed by a '---' line")
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError as error:
        raise HubError(400, f"README.md metadata is not valid YAML: {error}") from None
    if data is not None and not isinstance(data, dict):
        raise HubError(400, "README.md metadata must be a mapping")
    return data


class FakeHub:
    """The repositories and the rules; the HTTP handler only translates requests into these calls."""

    def __init__(self, tokens: tuple[str, ...] = (DEFAULT_TOKEN,)):
        self.tokens = set(tokens)
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of every request served

    # ------------------------------------------------------------------------------------ access
    def check_token(self, token: str | None, required: bool) -> bool:
        """True for a valid token; a wrong token always fails, a missing one only where `required`."""
        if token is None:
            if required:
                raise HubError(401, "You must be authenticated to do this (no token was sent)")
            return False
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return True

    def repo(self, repo_id: str, authenticated: bool) -> Repo:
        """The repository; private ones are hidden (RepoNotFound) from anonymous readers, as on the Hub."""
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authenticated):
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    # ------------------------------------------------------------------------------------ writes
    def create_repo(self, repo_id: str, private: bool) -> Repo:
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise HubError(400, f"repository ids are 'namespace/name', got {repo_id!r}")
        with self.lock:
            if repo_id in self.repos:
                raise HubError(409, f"You already created this model repo: {repo_id}")
            repo = Repo(repo_id, private, time.time())
            first = make_commit(None, {}, "initial commit")
            repo.commits[first.oid] = first
            repo.branches[DEFAULT_BRANCH] = first.oid
            self.repos[repo_id] = repo
            return repo

    def create_branch(self, repo: Repo, branch: str, starting_point: str | None) -> None:
        if not branch or branch.startswith("refs/") or branch in repo.commits:
            raise HubError(400, f"Invalid branch name: {branch!r}")
        with self.lock:
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = repo.resolve(starting_point or DEFAULT_BRANCH).oid

    def commit(self, repo: Repo, branch: str, lines: list[dict]) -> Commit:
        """Apply an NDJSON commit payload to a branch and move the branch to the new commit."""
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0].get("value") or {}
        with self.lock:
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch} (commits go to branches)", "RevisionNotFound")
            parent = repo.commits[repo.branches[branch]]
            expected = header.get("parentCommit")
            if expected and not parent.oid.startswith(expected):
                raise HubError(412, f"parentCommit {expected} is not the head of {branch} ({parent.oid})")
            files = dict(parent.files)
            for line in lines[1:]:
                apply_operation(files, line.get("key"), line.get("value") or {})
            new = make_commit(parent, files, header.get("summary") or "")
            repo.commits[new.oid] = new
            repo.branches[branch] = new.oid
            return new

    # ------------------------------------------------------------------------------------ reads
    def model_info(self, repo: Repo, revision: str) -> dict:
        commit = repo.resolve(revision)
        metadata = card_metadata(commit.files.get("README.md")) or {}
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(metadata.get("tags") or []),
            "cardData": metadata or None,
            "siblings": [{"rfilename": path, "size": len(data)} for path, data in sorted(commit.files.items())],
            "createdAt": iso_time(repo.created),
            "lastModified": iso_time(commit.created),
        }
        for key in ("library_name", "pipeline_tag"):
            if key in metadata:
                info[key] = metadata[key]
        if "config.json" in commit.files:
            try:
                config = json.loads(commit.files["config.json"])
                info["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
            except ValueError:
                pass
        return info

    def tree(self, repo: Repo, revision: str, folder: str, recursive: bool) -> list[dict]:
        commit = repo.resolve(revision)
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries, folders = [], set()
        for path, data in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entries.append({"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)})
        if prefix and not entries and not folders:
            raise HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        directories = [{"type": "directory", "path": p, "oid": hashlib.sha1(p.encode()).hexdigest()} for p in sorted(folders)]
        return directories + entries


def apply_operation(files: dict[str, bytes], key: str | None, value: dict) -> None:
    """One line of a commit payload applied to the file table (in place)."""
    path = value.get("path", "")
    if key == "file":
        if value.get("encoding") != "base64":
            raise HubError(400, f"{path}: only base64-encoded file content is supported")
        check_path(path)
        files[path] = base64.b64decode(value.get("content", ""))
    elif key == "deletedFile":
        if path not in files:
            raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        del files[path]
    elif key == "deletedFolder":
        prefix = path.rstrip("/") + "/"
        for name in [p for p in files if p.startswith(prefix)]:
            del files[name]
    elif key == "lfsFile":
        raise HubError(422, f"{path}: this fake Hub stores regular files only (no LFS); set HF_HUB_DISABLE_XET=1")
    else:
        raise HubError(400, f"unsupported commit operation {key!r}")


def check_path(path: str) -> None:
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")):
        raise HubError(400, f"invalid file path in repository: {path!r}")
    if path.split("/")[0] in (".git", ".cache"):
        raise HubError(400, f"forbidden folder in repository: {path!r}")


def iso_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(seconds))


# ============================================================================================ HTTP
class FakeHubHandler(BaseHTTPRequestHandler):
    """Routes requests to the server's `FakeHub`; every response has a Content-Length (HTTP/1.1)."""

    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format, *args):  # noqa: A002  (quiet: the hub keeps its own log)
        pass

    # ------------------------------------------------------------------------------------ plumbing
    def _token(self) -> str | None:
        value = self.headers.get("Authorization", "")
        if not value.lower().startswith("bearer "):
            return None
        return value[len("bearer "):].strip() or None

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.server.hub.log.append((self.command, self.path, status))

    def _json(self, status: int, data, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, error: HubError, head: bool = False, extra: dict | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": error.message.encode("ascii", "replace").decode()}
        if error.code:
            headers["X-Error-Code"] = error.code
        headers.update(extra or {})
        self._send(error.status, b"" if head else json.dumps({"error": error.message}).encode(), headers, head)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if segments[:1] == ["api"]:
                self._api(method, segments[1:], query)
            elif len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
                self._resolve(method, "/".join(segments[:2]), segments[3], "/".join(segments[4:]))
            else:
                raise HubError(404, f"no route for {method} {url.path}")
        except HubError as error:
            self._error(error, head=method == "HEAD")
        except (ValueError, KeyError) as error:
            self._error(HubError(400, f"bad request: {error}"), head=method == "HEAD")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    # ------------------------------------------------------------------------------------ routes
    def _api(self, method: str, segments: list[str], query: dict) -> None:
        hub = self.server.hub
        if method == "POST" and segments == ["repos", "create"]:
            hub.check_token(self._token(), required=True)
            payload = json.loads(self._body() or b"{}")
            if payload.get("type", "model") != "model":
                raise HubError(400, "this fake Hub serves model repositories only")
            name, namespace = payload.get("name"), payload.get("organization")
            repo_id = f"{namespace}/{name}" if namespace else f"user/{name}"
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            url = {"url": f"{self.server.url}/{repo_id}", "name": repo_id, "id": repo_id}
            try:
                hub.create_repo(repo_id, private)
            except HubError as error:
                if error.status != 409:
                    raise
                # the Hub answers 409 with the existing repo's url, which create_repo(exist_ok=True) returns
                self._json(409, {"error": error.message, **url}, {"X-Error-Message": error.message})
                return
            self._json(200, url)
            return
        if method == "GET" and segments == ["agent-harnesses"]:  # huggingface_hub's best-effort agent registry
            self._json(200, {"standardEnvVars": [], "harnesses": {}})
            return
        if method == "POST" and segments == ["validate-yaml"]:
            payload = json.loads(self._body() or b"{}")
            try:
                card_metadata(payload.get("content", "").encode())
            except HubError as error:
                self._json(400, {"errors": [{"message": error.message}], "warnings": []})
                return
            self._json(200, {"errors": [], "warnings": []})
            return
        if len(segments) < 3 or segments[0] != "models":
            raise HubError(404, f"no API route /api/{'/'.join(segments)}")
        repo_id, rest = "/".join(segments[1:3]), segments[3:]
        authenticated = hub.check_token(self._token(), required=method == "POST")
        repo = hub.repo(repo_id, authenticated)
        if method == "GET" and not rest:
            self._json(200, hub.model_info(repo, DEFAULT_BRANCH))
        elif method == "GET" and rest[:1] == ["revision"] and len(rest) >= 2:
            self._json(200, hub.model_info(repo, "/".join(rest[1:])))
        elif method == "GET" and rest == ["refs"]:
            self._json(200, {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid}
                                          for b, oid in sorted(repo.branches.items())],
                             "tags": [], "converts": [], "pullRequests": []})
        elif method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
            recursive = query.get("recursive", "false").lower() in ("1", "true")
            self._json(200, hub.tree(repo, rest[1], "/".join(rest[2:]), recursive))
        elif method == "POST" and rest[:1] == ["branch"] and len(rest) >= 2:
            payload = json.loads(self._body() or b"{}")
            hub.create_branch(repo, "/".join(rest[1:]), payload.get("startingPoint"))
            self._json(200, {})
        elif method == "POST" and rest[:1] == ["preupload"] and len(rest) >= 2:
            self._reject_pull_requests(query)
            files = repo.resolve("/".join(rest[1:])).files
            payload = json.loads(self._body() or b"{}")
            self._json(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None}
                for f in payload.get("files", [])]})
        elif method == "POST" and rest[:1] == ["commit"] and len(rest) >= 2:
            self._reject_pull_requests(query)
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            commit = hub.commit(repo, "/".join(rest[1:]), lines)
            self._json(200, {"success": True, "commitOid": commit.oid, "pullRequestUrl": None,
                             "commitUrl": f"{self.server.url}/{repo.repo_id}/commit/{commit.oid}"})
        else:
            raise HubError(404, f"no API route {method} /api/{'/'.join(segments)}")

    @staticmethod
    def _reject_pull_requests(query: dict) -> None:
        if query.get("create_pr") in ("1", "true", "True"):
            raise HubError(400, "this fake Hub does not support pull requests")

    def _resolve(self, method: str, repo_id: str, revision: str, path: str) -> None:
        hub = self.server.hub
        repo = hub.repo(repo_id, hub.check_token(self._token(), required=False))
        commit = repo.resolve(revision)
        if path not in commit.files:
            error = HubError(404, f"Entry not found: {path}", "EntryNotFound")
            self._error(error, head=method == "HEAD", extra={"X-Repo-Commit": commit.oid})
            return
        data = commit.files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha1(data)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "none",
        }
        self._send(200, data, headers, head=method == "HEAD")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub
    url: str


class FakeHubServer:
    """A `FakeHub` served over HTTP from a background thread (port 0 picks a free port).

    `url` is the endpoint to put in `HF_ENDPOINT`, `token` a valid `HF_TOKEN`, `hub` the state (to inspect
    repositories in tests: `server.hub.repos["user/name"].branches`).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tokens: tuple[str, ...] = (DEFAULT_TOKEN,)):
        self.hub = FakeHub(tokens)
        self.token = tokens[0]
        self._server = _Server((host, port), FakeHubHandler)
        self._server.hub = self.hub
        self.url = self._server.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> "FakeHubServer":
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeHubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def files(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> dict[str, bytes]:
        """The files of a repository at a revision (for assertions)."""
        return dict(self.hub.repos[repo_id].resolve(revision).files)

    def file_url(self, repo_id: str, path: str, revision: str = DEFAULT_BRANCH) -> str:
        return f"{self.url}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Serve an in-memory fake Hugging Face Hub until interrupted.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    args = parser.parse_args(argv)
    server = FakeHubServer(args.host, args.port, (args.token,))
    print(f"HF_ENDPOINT={server.url} HF_TOKEN={server.token} HF_HUB_DISABLE_XET=1", flush=True)
    try:
        server._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._server.server_close()


if __name__ == "__main__":
    main()
