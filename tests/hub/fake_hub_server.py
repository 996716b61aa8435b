# SPDX-License-Identifier: Apache-2.0
"""A loopback fake of the Hugging Face Hub HTTP API, for tests only (stdlib, in memory, 127.0.0.1).

It implements just the routes that the real `huggingface_hub` 2.x client and transformers use to create a
repo, commit files (every file is answered `uploadMode: "regular"`, so the client sends the bytes
base64-inline in the commit: no LFS, no Xet), create branches and tags, describe a revision, list a tree
and resolve files (HEAD / GET with `X-Repo-Commit`, `ETag`, `Content-Length`, and the `X-Error-Code`
headers the client maps to `RepositoryNotFoundError` / `RevisionNotFoundError` / `EntryNotFoundError`).
See `shared/docs/hf-ecosystem.md` section 4.6 and Appendix A. It does NOT exercise LFS or Xet transfers,
which the real Hub uses for large files, nor authentication (any token is accepted).

    server = FakeHub.start()     # binds port 0
    server.url                   # "http://127.0.0.1:<port>", use as HF_ENDPOINT / endpoint=
    server.requests              # [(method, path, status)] for assertions and debugging
    server.stop()

Run `python tests/hub/fake_hub_server.py --port 8123` to use it by hand.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

__all__ = ["FakeHub"]

_TYPES = r"(models|datasets|spaces)"
_ROUTES = [  # (method, regex on the raw path, handler name); the repo id is matched non-greedily
    ("POST", r"^/api/repos/create$", "create_repo"),
    ("POST", r"^/api/validate-yaml$", "validate_yaml"),
    ("POST", rf"^/api/{_TYPES}/(.+?)/preupload/([^/]+)$", "preupload"),
    ("POST", rf"^/api/{_TYPES}/(.+?)/commit/([^/]+)$", "commit"),
    ("POST", rf"^/api/{_TYPES}/(.+?)/branch/([^/]+)$", "create_branch"),
    ("POST", rf"^/api/{_TYPES}/(.+?)/tag/([^/]+)$", "create_tag"),
    ("POST", rf"^/api/{_TYPES}/(.+?)/paths-info/([^/]+)$", "paths_info"),
    ("GET", rf"^/api/{_TYPES}/(.+?)/revision/([^/]+)$", "repo_info"),
    ("GET", rf"^/api/{_TYPES}/(.+?)/tree/([^/]+)(/.*)?$", "tree"),
    ("GET", rf"^/api/{_TYPES}/([^/]+/[^/]+)$", "repo_info_main"),
    ("GET", r"^/(?:(datasets|spaces)/)?(.+?)/resolve/([^/]+)/(.+)$", "resolve"),
]


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@dataclass
class _Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: bytes}

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None

    def new_commit(self, files: dict[str, bytes], parent: str | None) -> str:
        digest = hashlib.sha1((parent or "").encode())
        for path in sorted(files):
            digest.update(f"{path}\0{_sha1(files[path])}\n".encode())
        sha = digest.hexdigest()
        self.commits[sha] = files
        return sha


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # ---------------------------------------------------------------- plumbing
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)
        self.server.hub.requests.append((self.command, self.path, status))

    def _json(self, status: int, payload, headers: dict[str, str] | None = None, head: bool = False):
        self._send(status, json.dumps(payload).encode(), headers, head)

    def _error(self, status: int, code: str, message: str, head: bool = False):
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str, head: bool = False):
        path = urlparse(self.path).path
        for route_method, pattern, name in _ROUTES:
            match = re.match(pattern, path)
            if route_method == method and match:
                groups = [unquote(g) if g is not None else None for g in match.groups()]
                with self.server.hub.lock:
                    return (
                        getattr(self, "_" + name)(*groups, head=head)
                        if method == "GET"
                        else getattr(self, "_" + name)(*groups)
                    )
        self._error(404, "NotFound", f"fake hub: no route for {method} {path}", head=head)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("GET", head=True)

    def do_POST(self):
        self._dispatch("POST")

    def _repo(self, kind: str, repo_id: str, head: bool = False) -> _Repo | None:
        repo = self.server.hub.repos.get((kind.rstrip("s"), repo_id))
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
        return repo

    def _revision(self, repo: _Repo, revision: str, head: bool = False) -> str | None:
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
        return sha

    # ---------------------------------------------------------------- routes
    def _create_repo(self):
        payload = json.loads(self._body() or b"{}")
        name, organization = payload["name"], payload.get("organization")
        repo_id = f"{organization}/{name}" if organization else f"tester/{name}"
        kind = payload.get("type") or "model"
        url = f"{self.server.hub.url}/{'' if kind == 'model' else kind + 's/'}{repo_id}"
        if (kind, repo_id) in self.server.hub.repos:
            return self._json(409, {"error": "You already created this repo", "url": url})
        repo = _Repo()
        repo.refs["main"] = repo.new_commit(
            {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, None
        )
        self.server.hub.repos[(kind, repo_id)] = repo
        self._json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self):
        self._body()
        self._json(200, {})

    def _preupload(self, kind, repo_id, revision):
        payload = json.loads(self._body() or b"{}")
        if self._repo(kind, repo_id) is None:
            return
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in payload.get("files", [])]
        self._json(200, {"files": files, "commitOid": None})

    def _commit(self, kind, repo_id, revision):
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        repo = self._repo(kind, repo_id)
        if repo is None:
            return
        parent = self._revision(repo, revision)
        if parent is None:
            return
        files = dict(repo.commits[parent])
        for line in lines:
            value = line.get("value", {})
            if line.get("key") == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line.get("key") == "deletedFile":
                files.pop(value["path"], None)
            elif line.get("key") in ("lfsFile", "deletedFolder"):
                return self._error(400, "BadRequest", f"fake hub: {line['key']} operations are not supported")
        sha = repo.new_commit(files, parent)
        branch = revision if revision in repo.refs else "main"
        repo.refs[branch] = sha
        base = self.server.hub.url
        self._json(200, {"commitUrl": f"{base}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

    def _create_branch(self, kind, repo_id, branch):
        payload = json.loads(self._body() or b"{}")
        repo = self._repo(kind, repo_id)
        if repo is None:
            return
        if branch in repo.refs:
            return self._error(409, "BranchExists", f"Branch {branch} already exists")
        sha = self._revision(repo, payload.get("startingPoint") or "main")
        if sha is not None:
            repo.refs[branch] = sha
            self._json(200, {})

    def _create_tag(self, kind, repo_id, revision):
        payload = json.loads(self._body() or b"{}")
        repo = self._repo(kind, repo_id)
        if repo is None:
            return
        sha = self._revision(repo, revision)
        if sha is None:
            return
        if payload["tag"] in repo.refs:
            return self._error(409, "TagExists", f"Tag {payload['tag']} already exists")
        repo.refs[payload["tag"]] = sha
        self._json(200, {})

    def _info(self, kind, repo_id, revision, head=False):
        repo = self._repo(kind, repo_id, head)
        sha = repo and self._revision(repo, revision, head)
        if sha is None:
            return
        files = repo.commits[sha]
        siblings = [{"rfilename": path, "size": len(data)} for path, data in sorted(files.items())]
        self._json(
            200,
            {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "siblings": siblings, "tags": []},
            head=head,
        )

    def _repo_info(self, kind, repo_id, revision, head=False):
        self._info(kind, repo_id, revision, head)

    def _repo_info_main(self, kind, repo_id, head=False):
        self._info(kind, repo_id, "main", head)

    def _entries(self, files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict]:
        prefix = prefix.strip("/")
        entries, folders = [], set()
        for path, data in sorted(files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1 :] if prefix else path
            if "/" in rest and not recursive:
                folders.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                continue
            entries.append({"type": "file", "path": path, "size": len(data), "oid": _sha1(data)})
        entries += [
            {"type": "directory", "path": folder, "oid": _sha1(folder.encode()), "size": 0}
            for folder in sorted(folders)
        ]
        return entries

    def _tree(self, kind, repo_id, revision, subpath, head=False):
        repo = self._repo(kind, repo_id, head)
        sha = repo and self._revision(repo, revision, head)
        if sha is None:
            return
        query = parse_qs(urlparse(self.path).query)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        self._json(200, self._entries(repo.commits[sha], subpath or "", recursive), head=head)

    def _paths_info(self, kind, repo_id, revision):
        body = self._body().decode()
        repo = self._repo(kind, repo_id)
        sha = repo and self._revision(repo, revision)
        if sha is None:
            return
        try:
            paths = json.loads(body)["paths"]
        except ValueError:
            paths = parse_qs(body).get("paths", [])
        files = repo.commits[sha]
        self._json(
            200,
            [{"type": "file", "path": p, "size": len(files[p]), "oid": _sha1(files[p])} for p in paths if p in files],
        )

    def _resolve(self, kind, repo_id, revision, path, head=False):
        kind = kind or "models"
        repo = self._repo(kind, repo_id, head)
        sha = repo and self._revision(repo, revision, head)
        if sha is None:
            return
        files = repo.commits[sha]
        if path not in files:
            return self._error(404, "EntryNotFound", f"{path} does not exist at {revision}", head=head)
        data = files[path]
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": sha, "ETag": f'"{_sha1(data)}"'}
        self._send(200, data, headers, head=head)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: FakeHub


class FakeHub:
    """An in-memory fake Hub on 127.0.0.1; `start()` serves it from a daemon thread."""

    def __init__(self):
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.lock = threading.RLock()
        self._server: _Server | None = None
        self.url = ""

    @classmethod
    def start(cls, port: int = 0) -> FakeHub:
        hub = cls()
        hub._server = _Server(("127.0.0.1", port), _Handler)
        hub._server.hub = hub
        hub.url = f"http://127.0.0.1:{hub._server.server_address[1]}"
        threading.Thread(target=hub._server.serve_forever, daemon=True).start()
        return hub

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def files(self, repo_id: str, revision: str = "main", kind: str = "model") -> dict[str, bytes]:
        repo = self.repos[(kind, repo_id)]
        return dict(repo.commits[repo.resolve(revision)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Serve a fake, in-memory Hugging Face Hub on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=8123)
    hub = FakeHub.start(parser.parse_args().port)
    print(
        f"fake hub at {hub.url}; set HF_ENDPOINT={hub.url} HF_TOKEN=x HF_HUB_DISABLE_XET=1; Ctrl-C to stop", flush=True
    )
    threading.Event().wait()
