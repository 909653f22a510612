"""A Hub-compatible HTTP server on 127.0.0.1 serving local folders as dataset repositories, for fetch tests.

It answers the requests huggingface_hub makes for `repa data fetch`: the revision (``/api/datasets/R/revision/V``),
the recursive tree with sizes and LFS sha256 (``/api/datasets/R/tree/V``), and file downloads
(``/datasets/R/resolve/V/PATH``, HEAD and GET, with Range for resumed downloads). ``.tar`` files are
announced as LFS files. Faults for tests: ``gated`` repositories, a file whose listed sha256 is wrong
(``corrupt``), and a file whose first transfer is cut after some bytes (``cut_after``).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class LocalHub:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {name: Path(root) for name, root in repos.items()}
        self.gated: set[str] = set()
        self.corrupt: set[str] = set()  # repo paths whose listed sha256 is not their content's
        self.cut_after: dict[str, int] = {}  # repo path -> bytes sent by its first GET before the connection drops
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- the repository as the Hub describes it ---------------------------------------------------
    def commit(self, repo: str) -> str:
        h = hashlib.sha1()
        for p in self._files(repo):
            h.update(p.encode() + self._sha256(repo, p).encode())
        return h.hexdigest()

    def _files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def _sha256(self, repo: str, path: str) -> str:
        digest = hashlib.sha256((self.repos[repo] / path).read_bytes()).hexdigest()
        return digest[::-1] if path in self.corrupt else digest

    def _entry(self, repo: str, path: str) -> dict:
        size = (self.repos[repo] / path).stat().st_size
        entry = {"type": "file", "path": path, "size": size,
                 "oid": hashlib.sha1((self.repos[repo] / path).read_bytes()).hexdigest()}
        if path.endswith(".tar"):
            entry["lfs"] = {"oid": self._sha256(repo, path), "size": size, "pointerSize": 134}
        return entry

    # -- HTTP ---------------------------------------------------------------------------------------
    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        url = urlparse(h.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        self.requests.append((h.command, url.path, h.headers.get("Range")))
        if parts[:2] == ["api", "datasets"] and len(parts) >= 6:
            repo, kind = "/".join(parts[2:4]), parts[4]
            if self._refuse(h, repo):
                return
            if kind == "revision":
                return self._json(h, {"id": repo, "sha": self.commit(repo), "private": False,
                                      "siblings": [{"rfilename": p} for p in self._files(repo)]}, body)
            if kind == "tree":
                return self._json(h, [self._entry(repo, p) for p in self._files(repo)], body)
        if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
            repo, path = "/".join(parts[1:3]), "/".join(parts[5:])
            if self._refuse(h, repo):
                return
            return self._file(h, repo, path, body)
        self._error(h, 404, "EntryNotFound")

    def _refuse(self, h, repo: str) -> bool:
        if repo not in self.repos:
            self._error(h, 401, "RepoNotFound")
            return True
        if repo in self.gated:
            self._error(h, 403, "GatedRepo", "Access to this dataset is restricted")
            return True
        return False

    def _json(self, h, obj, body: bool) -> None:
        data = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def _error(self, h, status: int, code: str, message: str = "") -> None:
        data = json.dumps({"error": message or code}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message or code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _file(self, h, repo: str, path: str, body: bool) -> None:
        local = self.repos[repo] / path
        if not local.is_file():
            return self._error(h, 404, "EntryNotFound")
        data = local.read_bytes()
        start = 0
        if h.headers.get("Range", "").startswith("bytes="):
            start = int(h.headers["Range"][6:].split("-")[0])
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", self.commit(repo))
        etag = self._sha256(repo, path) if path.endswith(".tar") else hashlib.sha1(data).hexdigest()
        h.send_header("ETag", f'"{etag}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        cut = self.cut_after.pop(path, None) if h.command == "GET" else None
        if cut is not None:
            h.wfile.write(data[start : start + cut])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)  # the transfer breaks mid-file
            return
        h.wfile.write(data[start:])
