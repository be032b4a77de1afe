"""A local Hugging Face-compatible hub (the real hub cannot be reached here): the two routes
huggingface_hub uses to resolve and download a snapshot, over a directory per repo, with a commit sha
per repo, private repos that need a token, and a log of the Authorization headers it saw."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


class LocalHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.auth_seen: list[str | None] = []
        self.downloads: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub.serve(self, body=False)

            def do_GET(self):
                hub.serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, repo_id: str, directory: Path, *, private: bool = False, token: str | None = None) -> str:
        files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
        sha = hashlib.sha1(b"".join((directory / f).read_bytes() for f in files)).hexdigest()
        self.repos[repo_id] = {"dir": directory, "files": files, "sha": sha, "private": private, "token": token}
        return sha

    def close(self) -> None:
        self.server.shutdown()

    def serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(handler.path.split("?", 1)[0])
        auth = handler.headers.get("Authorization")
        self.auth_seen.append(auth)
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            if "/tree/" in rest:  # the file listing snapshot_download walks
                repo_id, _, revision = rest.partition("/tree/")
                repo = self.repos.get(repo_id)
                if not self._allowed(handler, repo, auth):
                    return
                if revision not in ("main", repo["sha"]):
                    return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
                entries = [{"type": "file", "path": f, "size": (repo["dir"] / f).stat().st_size,
                            "oid": hashlib.sha1((repo["dir"] / f).read_bytes()).hexdigest()} for f in repo["files"]]
                return self._send(handler, 200, json.dumps(entries).encode(), body,
                                  {"Content-Type": "application/json"})
            repo_id, _, revision = rest.partition("/revision/")
            repo = self.repos.get(repo_id)
            if not self._allowed(handler, repo, auth):
                return
            if revision and revision not in ("main", repo["sha"]):
                return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            payload = {"id": repo_id, "modelId": repo_id, "sha": repo["sha"], "private": repo["private"],
                       "siblings": [{"rfilename": f} for f in repo["files"]], "tags": [], "downloads": 0,
                       "likes": 0, "disabled": False, "gated": False}
            return self._send(handler, 200, json.dumps(payload).encode(), body, {"Content-Type": "application/json"})
        parts = path.lstrip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            repo = self.repos.get(repo_id)
            if not self._allowed(handler, repo, auth):
                return
            if revision not in ("main", repo["sha"]):
                return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            if filename not in repo["files"]:
                return self._error(handler, 404, "EntryNotFound", f"{filename} does not exist")
            data = (repo["dir"] / filename).read_bytes()
            if body:
                self.downloads.append(filename)
            return self._send(handler, 200, data, body, {
                "X-Repo-Commit": repo["sha"], "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "Content-Type": "application/octet-stream"})
        self._error(handler, 404, "EntryNotFound", path)

    def _allowed(self, handler, repo, auth) -> bool:
        if repo is None:
            self._error(handler, 404, "RepoNotFound", "Repository not found")
            return False
        if repo["private"] and auth != f"Bearer {repo['token']}":
            self._error(handler, 401, "RepoNotFound", "Repository not found")
            return False
        return True

    def _error(self, handler, status: int, code: str, message: str) -> None:
        self._send(handler, status, json.dumps({"error": message}).encode(), True,
                   {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"})

    @staticmethod
    def _send(handler, status: int, data: bytes, body: bool, headers: dict[str, str]) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)
