"""A tiny local stand-in for the Hugging Face Hub, enough for ``huggingface_hub.snapshot_download``.

Emulated, as huggingface_hub 2.4.0 calls them (endpoint = ``HF_ENDPOINT``):

* ``GET /api/models/{repo}/revision/{rev}`` (and ``/api/models/{repo}``): ``HfApi.repo_info`` -> model_info.
  Needs ``sha`` (the commit); ``id``, ``siblings``, ... are informational.
* ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=..&expand=..``: ``HfApi.list_repo_tree``. One page (no
  ``Link: <..>; rel="next"``), entries ``{"type": "file"|"directory", "oid", "size", "path"}``; LFS files also carry
  ``"lfs": {"oid": sha256, "size", "pointerSize"}``. No ``xetHash``: Xet downloads are never triggered.
* ``HEAD /{repo}/resolve/{rev}/{path}`` (``get_hf_file_metadata``; ``snapshot_download`` passes the commit sha as
  ``rev``) and ``GET`` of the same url:
    - a regular (git) file: 200 with ``X-Repo-Commit``, ``ETag`` ("git blob sha1", quoted) and ``Content-Length``;
    - an LFS file (``.safetensors``, pickles ...): 302 to the "CDN" (a second server, another port = another origin,
      so the client neither follows the redirect on HEAD nor sends ``Authorization`` there) with ``X-Repo-Commit``,
      ``X-Linked-Etag`` (sha256, quoted), ``X-Linked-Size`` and ``Location``;
    - a missing file: 404 with ``X-Error-Code: EntryNotFound`` and ``X-Repo-Commit``.
  No ``X-Xet-Hash`` / ``X-Xet-Refresh-Route`` / ``Link: rel="xet-auth"`` headers: the plain HTTP path is used.
* ``GET /api/agent-harnesses``: huggingface_hub's user-agent code fetches this registry once a day (when telemetry is
  on and the hub is online); answered with an empty registry.
* CDN: ``GET``/``HEAD /cdn/{sha256}`` with ``Content-Length`` (and ``Range: bytes=N-`` for resumed downloads).

Anything else is answered 404 (without hub error headers, so the client raises a plain HTTP error) and recorded in
``hub.unexpected``: tests assert it stays empty, so a new client behaviour fails loudly instead of silently.

Modes: ``hub.mode = "gated"`` answers every request 401 with the hub's gated-repo headers
(``X-Error-Code: GatedRepo``, ``X-Error-Message``) and JSON body; ``"ok"`` is the normal mode.
Every request is recorded in ``hub.requests`` (server, method, path, query, Authorization, status).
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

# What .gitattributes of a real model repo sends to LFS (the hub's default list, abridged).
LFS_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle", ".h5", ".msgpack", ".onnx",
                ".model", ".gguf")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
LAST_MODIFIED = "2024-01-01T00:00:00.000Z"


@dataclass(frozen=True)
class RepoFile:
    path: str  # "unet/config.json"
    data: bytes
    git_sha1: str
    sha256: str

    @property
    def is_lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)

    @property
    def oid(self) -> str:
        """The tree "oid": the git blob id (of the LFS pointer file for LFS files, which we do not need exactly)."""
        return self.git_sha1


@dataclass
class Repo:
    repo_id: str
    files: dict[str, RepoFile]
    commit: str
    gated: bool = False


@dataclass(frozen=True)
class Request:
    server: str  # "hub" | "cdn"
    method: str
    path: str  # unquoted, without the query
    query: dict
    authorization: str | None
    status: int
    range: str | None = None  # the Range header of a CDN GET (a resumed download)


@dataclass
class FakeHub:
    mode: str = "ok"  # "ok" | "gated"
    # sha256 -> bytes: a CDN GET of that file declares its full length, sends this many bytes and drops the
    # connection (a network cut mid-file); a Range GET of it sends nothing more, so the client cannot finish
    # until the cut is lifted (del hub.cut[sha]).
    cut: dict[str, int] = field(default_factory=dict)
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.endpoint = ""
        self.cdn = ""

    # ---------------------------------------------------------------------------------- repos
    def add_repo(self, repo_id: str, folder: Path | None = None, extra_files: dict[str, bytes] | None = None) -> Repo:
        """Serve every file under folder (paths relative to it) plus extra_files as the repo's main branch."""
        contents: dict[str, bytes] = {}
        if folder is not None:
            for p in sorted(Path(folder).rglob("*")):
                if p.is_file():
                    contents[p.relative_to(folder).as_posix()] = p.read_bytes()
        contents.update(extra_files or {})
        files = {}
        for path, data in sorted(contents.items()):
            git_sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            files[path] = RepoFile(path, data, git_sha1, hashlib.sha256(data).hexdigest())
        commit = hashlib.sha1(repr([(f.path, f.git_sha1) for f in files.values()]).encode()).hexdigest()
        repo = Repo(repo_id, files, commit)
        self.repos[repo_id] = repo
        return repo

    # ---------------------------------------------------------------------------------- queries for tests
    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.unexpected.clear()

    def take(self) -> list[Request]:
        """The requests recorded so far, and forget them (``unexpected`` is kept: it must stay empty)."""
        with self._lock:
            taken = list(self.requests)
            self.requests.clear()
        return taken

    def _record(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    def _flag(self, what: str) -> None:
        with self._lock:
            self.unexpected.append(what)

    def requested_files(self, repo_id: str, requests: list[Request] | None = None) -> set[str]:
        """Repo paths the client asked about: HEAD/GET of /resolve/ urls and CDN GETs (mapped back by sha256)."""
        repo = self.repos[repo_id]
        by_sha = {}
        for f in repo.files.values():
            by_sha.setdefault(f.sha256, []).append(f.path)
        prefix = f"/{repo_id}/resolve/"
        out: set[str] = set()
        for r in (list(self.requests) if requests is None else requests):
            if r.server == "hub" and r.path.startswith(prefix):
                out.add(r.path[len(prefix):].split("/", 1)[1])
            elif r.server == "cdn" and r.path.startswith("/cdn/"):
                out.update(by_sha.get(r.path[len("/cdn/"):], []))
        return out

    def downloaded_files(self, repo_id: str, requests: list[Request] | None = None) -> set[str]:
        """Repo paths whose bytes were actually sent (GET with status 200/206)."""
        repo = self.repos[repo_id]
        by_sha = {f.sha256: f.path for f in repo.files.values()}
        prefix = f"/{repo_id}/resolve/"
        out = set()
        for r in (list(self.requests) if requests is None else requests):
            if r.method != "GET" or r.status not in (200, 206):
                continue
            if r.server == "hub" and r.path.startswith(prefix):
                out.add(r.path[len(prefix):].split("/", 1)[1])
            elif r.server == "cdn":
                out.add(by_sha.get(r.path[len("/cdn/"):], r.path))
        return out

    # ---------------------------------------------------------------------------------- server
    def start(self) -> FakeHub:
        for name in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, name))
            server.daemon_threads = True
            thread = threading.Thread(target=server.serve_forever, name=f"fake-{name}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        self.endpoint = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------- routing
    def _resolve_rev(self, repo: Repo, rev: str) -> bool:
        return rev in ("main", repo.commit)

    def route_hub(self, method: str, path: str, query: dict) -> tuple[int, dict, bytes]:
        if self.mode == "gated":
            return self._gated(path)
        if method == "GET" and path == "/api/agent-harnesses":
            return _json(200, {"standardEnvVars": [], "harnesses": {}})
        if path.startswith("/api/models/"):
            if method != "GET":
                return self._unexpected(method, path, query)
            return self._api_models(path[len("/api/models/"):], query)
        if "/resolve/" in path and method in ("GET", "HEAD"):
            return self._resolve(method, path)
        return self._unexpected(method, path, query)

    def route_cdn(self, method: str, path: str, query: dict, range_header: str | None) -> tuple[int, dict, bytes]:
        if method in ("GET", "HEAD") and path.startswith("/cdn/"):
            sha = path[len("/cdn/"):]
            for repo in self.repos.values():
                for f in repo.files.values():
                    if f.sha256 == sha:
                        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{sha}"',
                                   "Accept-Ranges": "bytes"}
                        cut = self.cut.get(sha)
                        if range_header:
                            start = int(range_header.split("=", 1)[1].split("-", 1)[0])
                            headers["Content-Range"] = f"bytes {start}-{len(f.data) - 1}/{len(f.data)}"
                            if cut is not None:
                                headers["Content-Length"] = str(len(f.data) - start)
                                return 206, headers, b""
                            return 206, headers, f.data[start:]
                        if cut is not None and method == "GET":
                            headers["Content-Length"] = str(len(f.data))
                            return 200, headers, f.data[:cut]
                        return 200, headers, f.data
        return self._unexpected(method, "cdn:" + path, query)

    def _unexpected(self, method: str, path: str, query: dict) -> tuple[int, dict, bytes]:
        self._flag(f"{method} {path}" + (f"?{query}" if query else ""))
        return 404, {"Content-Type": "text/plain"}, f"FakeHub does not emulate {method} {path}".encode()

    def _gated(self, path: str) -> tuple[int, dict, bytes]:
        repo_id = next((r for r in self.repos if f"/{r}/" in path + "/"), "the model")
        msg = (f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to "
               "access it. Please log in.")
        status, headers, body = _json(401, {"error": msg})
        headers.update({"X-Error-Code": "GatedRepo", "X-Error-Message": msg})
        return status, headers, body

    def _repo_and_rest(self, spec: str) -> tuple[Repo | None, str]:
        for repo_id, repo in self.repos.items():
            if spec == repo_id or spec.startswith(repo_id + "/"):
                return repo, spec[len(repo_id):].lstrip("/")
        return None, spec

    def _repo_not_found(self) -> tuple[int, dict, bytes]:
        # The real hub answers 401 (not 404) for a missing repo too, so as not to reveal private repos.
        msg = "Repository not found"
        status, headers, body = _json(401, {"error": msg})
        headers.update({"X-Error-Code": "RepoNotFound", "X-Error-Message": msg})
        return status, headers, body

    def _revision_not_found(self, rev: str) -> tuple[int, dict, bytes]:
        msg = f"Invalid rev id: {rev}"
        status, headers, body = _json(404, {"error": msg})
        headers.update({"X-Error-Code": "RevisionNotFound", "X-Error-Message": msg})
        return status, headers, body

    def _api_models(self, spec: str, query: dict) -> tuple[int, dict, bytes]:
        repo, rest = self._repo_and_rest(spec)
        if repo is None:
            return self._repo_not_found()
        if rest == "" or rest.startswith("revision/"):
            rev = rest[len("revision/"):] if rest else "main"
            if not self._resolve_rev(repo, rev):
                return self._revision_not_found(rev)
            if query.get("expand") or query.get("blobs") or query.get("securityStatus"):
                return self._unexpected("GET", "/api/models/" + spec, query)
            return _json(200, {
                "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": repo.commit,
                "lastModified": LAST_MODIFIED, "createdAt": LAST_MODIFIED, "private": False, "gated": False,
                "disabled": False, "downloads": 0, "likes": 0, "library_name": "diffusers",
                "tags": ["diffusers", "safetensors"], "pipeline_tag": "text-to-image",
                "siblings": [{"rfilename": p} for p in repo.files],
            })
        if rest.startswith("tree/"):
            rev, _, sub = rest[len("tree/"):].partition("/")
            if not self._resolve_rev(repo, rev):
                return self._revision_not_found(rev)
            if query.get("expand", "false").lower() == "true":
                return self._unexpected("GET", "/api/models/" + spec, query)
            recursive = query.get("recursive", "false").lower() == "true"
            return _json(200, _tree(repo, sub, recursive))
        return self._unexpected("GET", "/api/models/" + spec, query)

    def _resolve(self, method: str, path: str) -> tuple[int, dict, bytes]:
        spec, _, tail = path[1:].partition("/resolve/")
        repo = self.repos.get(spec)
        if repo is None:
            return self._repo_not_found()
        rev, _, filename = tail.partition("/")
        if not self._resolve_rev(repo, rev):
            return self._revision_not_found(rev)
        f = repo.files.get(filename)
        common = {"X-Repo-Commit": repo.commit, "Access-Control-Expose-Headers":
                  "X-Repo-Commit,X-Linked-Etag,X-Linked-Size,ETag,Location"}
        if f is None:
            msg = "Entry not found"
            status, headers, body = _json(404, {"error": msg})
            headers.update(common, **{"X-Error-Code": "EntryNotFound", "X-Error-Message": msg})
            return status, headers, body
        if f.is_lfs:
            location = f"{self.cdn}/cdn/{f.sha256}?response-content-disposition=" + quote(
                f'inline; filename="{filename.rsplit("/", 1)[-1]}"')
            return 302, {**common, "Location": location, "ETag": f'"{f.sha256}"',
                         "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(len(f.data)),
                         "Content-Type": "text/plain"}, b"Found. Redirecting to " + location.encode()
        return 200, {**common, "ETag": f'"{f.git_sha1}"', "Content-Type": "application/octet-stream"}, f.data


def _json(status: int, obj) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(obj).encode()


def _tree(repo: Repo, sub: str, recursive: bool) -> list[dict]:
    prefix = sub.rstrip("/") + "/" if sub else ""
    entries: dict[str, dict] = {}
    for f in repo.files.values():
        if not f.path.startswith(prefix):
            continue
        rel = f.path[len(prefix):]
        parts = rel.split("/")
        # Folders on the way (all of them when recursive, only the first level otherwise).
        for depth in range(1, len(parts)):
            folder = prefix + "/".join(parts[:depth])
            entries.setdefault(folder, {"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                        "size": 0, "path": folder})
            if not recursive:
                break
        if not recursive and len(parts) > 1:
            continue
        entry = {"type": "file", "oid": f.oid, "size": len(f.data), "path": f.path}
        if f.is_lfs:
            entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
        entries[f.path] = entry
    if sub and not entries:
        return []
    return [entries[k] for k in sorted(entries)]


def _make_handler(hub: FakeHub, server_name: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "FakeHub/1.0"

        def log_message(self, fmt, *args):  # keep test output clean
            pass

        def _handle(self, method: str) -> None:
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            try:
                if server_name == "hub":
                    status, headers, body = hub.route_hub(method, path, query)
                else:
                    status, headers, body = hub.route_cdn(method, path, query, self.headers.get("Range"))
            except Exception as exc:  # noqa: BLE001 - a bug in the fake must show up in the test, not hang it
                hub._flag(f"{method} {path}: FakeHub error {type(exc).__name__}: {exc}")
                status, headers, body = 500, {"Content-Type": "text/plain"}, repr(exc).encode()
            hub._record(Request(server_name, method, path, query, self.headers.get("Authorization"), status,
                                self.headers.get("Range")))
            self.send_response(status)
            declared = headers.pop("Content-Length", None)  # a cut: more is declared than is sent
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("X-Request-Id", "Root=fake-" + hashlib.md5(self.path.encode()).hexdigest()[:12])
            self.send_header("Content-Length", declared or str(len(body)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(body)
            if declared is not None and int(declared) != len(body):
                self.close_connection = True

        def do_GET(self):
            self._handle("GET")

        def do_HEAD(self):
            self._handle("HEAD")

        def do_POST(self):
            self._handle("POST")

        def do_PUT(self):
            self._handle("PUT")

        def do_DELETE(self):
            self._handle("DELETE")

    return Handler
