"""A Hugging Face hub on 127.0.0.1, for tests that must not touch the network: it answers the two requests
``hf_hub_download`` makes (HEAD for the commit, ETag and size; GET for the bytes) the way the hub does, with
the hub's error codes, so huggingface_hub's own client runs unchanged against it (``HF_ENDPOINT``).
``fill_cache`` writes the same files straight into a cache folder in huggingface_hub's layout, as a user
copying a cache to an offline machine would."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str
    lfs: frozenset[str] = frozenset({"torchscript_model.pt"})

    def etag(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if name in self.lfs else git_blob_sha1(data)


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo]  # "ORG/REPO" for models, "datasets/ORG/REPO" for datasets
    requests: list[str] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                path = unquote(self.path.split("?")[0]).lstrip("/")
                hub.requests.append(f"{self.command} /{path}")
                repo_key, sep, rest = path.partition("/resolve/")
                revision, _, name = rest.partition("/")
                repo = hub.repos.get(repo_key)
                if not sep or repo is None:
                    return self._error(404, "RepoNotFound")
                if revision not in ("main", repo.commit):
                    return self._error(404, "RevisionNotFound")
                if name not in repo.files:
                    return self._error(404, "EntryNotFound")
                data = repo.files[name]
                self.send_response(200)
                self.send_header("X-Repo-Commit", repo.commit)
                etag = f'"{repo.etag(name)}"'
                self.send_header("X-Linked-Etag" if name in repo.lfs else "ETag", etag)
                if name in repo.lfs:
                    self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _error(self, status: int, code: str) -> None:
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


def fill_cache(cache: Path, repo_id: str, repo: FakeRepo, repo_type: str = "model") -> Path:
    """The repository's files in huggingface_hub's cache layout (blobs named by ETag, snapshot links, refs/main)."""
    folder = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / repo.commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in repo.files.items():
        blob = folder / "blobs" / repo.etag(name)
        blob.write_bytes(data)
        link = snapshot / name
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(repo.commit)
    return snapshot
