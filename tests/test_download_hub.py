"""The hub source against a local stand-in for the Hugging Face hub (127.0.0.1; never the network).

The stand-in serves the endpoints huggingface_hub's snapshot_download uses: repo info at a revision, the recursive
tree listing (with LFS sha256), and /resolve/ downloads with HEAD, ETag, X-Repo-Commit and Range.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llmopt.download.hub import fetch_hub
from llmopt.download.synthetic import write_synthetic
from llmopt.errors import LlmoptError
from llmopt.registry import load

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class StandInHub:
    """A one-repo hub: ``files`` (name -> bytes) at ``COMMIT``; ``lfs_sha`` may lie about a file's sha256."""

    def __init__(self, repo: str, files: dict[str, bytes], lfs_sha: dict[str, str] | None = None,
                 drop_once: set[str] | None = None):
        self.repo, self.files, self.lfs_sha, self.requests = repo, files, lfs_sha or {}, []
        self.drop_once = set(drop_once or ())  # files whose first download breaks off halfway

    def sha(self, name: str) -> str:
        return self.lfs_sha.get(name) or hashlib.sha256(self.files[name]).hexdigest()

    def _handler(hub):  # noqa: N805 - the closure's "self" is the hub
        repo = re.escape(hub.repo)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, body=b"", headers=None):
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self):
                hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                path = self.path.split("?")[0]
                as_json = {"Content-Type": "application/json"}
                if m := re.fullmatch(rf"/api/models/{repo}/revision/([^/]+)", path):
                    if m.group(1) not in ("main", COMMIT):
                        return self.reply(404, b'{"error": "Revision Not Found"}',
                                          {**as_json, "X-Error-Code": "RevisionNotFound"})
                    body = {"id": hub.repo, "sha": COMMIT, "siblings": [{"rfilename": n} for n in hub.files]}
                    return self.reply(200, json.dumps(body).encode(), as_json)
                if re.fullmatch(rf"/api/models/{repo}/tree/{COMMIT}", path):
                    tree = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest(),
                             **({"lfs": {"oid": hub.sha(n), "size": len(d), "pointerSize": 134}}
                                if n.endswith(".safetensors") else {})} for n, d in hub.files.items()]
                    return self.reply(200, json.dumps(tree).encode(), as_json)
                if (m := re.fullmatch(rf"/{repo}/resolve/{COMMIT}/(.+)", path)) and m.group(1) in hub.files:
                    name, data = m.group(1), hub.files[m.group(1)]
                    etag = hub.sha(name) if name.endswith(".safetensors") else hashlib.sha1(data).hexdigest()
                    headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
                    if rng := self.headers.get("Range"):
                        start = int(rng.split("=")[1].split("-")[0])
                        return self.reply(206, data[start:], {**headers,
                                                              "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
                    if self.command == "GET" and name in hub.drop_once:
                        hub.drop_once.discard(name)
                        self.send_response(200)
                        for key, value in {**headers, "Content-Length": str(len(data))}.items():
                            self.send_header(key, value)
                        self.end_headers()
                        self.wfile.write(data[: len(data) // 2])
                        self.close_connection = True
                        return None
                    return self.reply(200, data, headers)
                return self.reply(404, b'{"error": "Repository not found"}', {**as_json, "X-Error-Code": "RepoNotFound"})

            do_HEAD = do_GET

        return Handler

    def __enter__(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory) -> dict[str, bytes]:
    """A real (tiny synthetic) model folder, as a hub repo would hold it, plus a README the patterns leave out."""
    folder = tmp_path_factory.mktemp("repo") / "m"
    write_synthetic("gemma-2-2b-it", load().model("gemma-2-2b-it"), folder, "tiny")
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "manifest.json"}
    return {**files, "README.md": b"# not downloaded\n"}


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return tmp_path


def entry(revision="main"):
    return {"hf_repo": "org/model", "revision": revision}


def test_snapshot_from_stand_in(env, monkeypatch, repo_files):
    with StandInHub("org/model", repo_files) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        manifest = fetch_hub("m", entry(), env / "out", cache_dir=env / "cache")
    out = env / "out"
    assert manifest["source"] == "hub" and manifest["scale"] == "real"
    assert manifest["provenance"]["commit"] == COMMIT and manifest["provenance"]["revision"] == "main"
    assert "README.md" not in manifest["files"]  # allow_patterns
    for name, data in repo_files.items():
        if name != "README.md":
            assert (out / name).read_bytes() == data
            assert manifest["files"][name] == hashlib.sha256(data).hexdigest()
    assert json.loads((out / "manifest.json").read_text()) == manifest
    auth = {h.get("authorization") for _, _, h in hub.requests}
    assert auth == {"Bearer hf_test_token"}  # the token comes from the environment


def test_pinned_commit_and_cache_reuse(env, monkeypatch, repo_files):
    with StandInHub("org/model", repo_files) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        fetch_hub("m", entry(COMMIT), env / "a", cache_dir=env / "cache")
        first = [p for c, p, _ in hub.requests if c == "GET" and "/resolve/" in p]
        hub.requests.clear()
        fetch_hub("m", entry(COMMIT), env / "b", cache_dir=env / "cache")
        again = [p for c, p, _ in hub.requests if c == "GET" and "/resolve/" in p]
    assert any(p.endswith("model.safetensors") for p in first)
    assert not again  # everything came from the blob cache
    assert not any("/revision/" in p for _, p, _ in hub.requests)  # a commit hash needs no resolving


def test_resumes_a_broken_download(env, monkeypatch, repo_files):
    """A download cut off halfway is continued from where it stopped (a Range request), not restarted.

    huggingface_hub writes in 10 MiB chunks, so the file must be larger than that for a chunk to land first."""
    import torch
    from safetensors.torch import save

    data = save({"w": torch.arange(6 << 20, dtype=torch.float32)})  # 24 MiB
    files = {"config.json": repo_files["config.json"], "model.safetensors": data}
    with StandInHub("org/model", files, drop_once={"model.safetensors"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        manifest = fetch_hub("m", entry(), env / "out", cache_dir=env / "cache")
    ranges = [h.get("range") for c, p, h in hub.requests if c == "GET" and p.endswith("model.safetensors")]
    assert ranges[0] is None and len(ranges) == 2 and re.fullmatch(r"bytes=[1-9]\d*-", ranges[1])
    assert (env / "out" / "model.safetensors").read_bytes() == data
    assert manifest["files"]["model.safetensors"] == hashlib.sha256(data).hexdigest()


def test_checksum_mismatch_leaves_nothing(env, monkeypatch, repo_files):
    with StandInHub("org/model", repo_files, lfs_sha={"model.safetensors": "f" * 64}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(LlmoptError, match=r"model\.safetensors: sha256 differs from the hub's \(f{64}\)") as err:
            fetch_hub("m", entry(), env / "out", cache_dir=env / "cache")
    assert "\n" not in str(err.value) and not (env / "out").exists()


def test_truncated_safetensors_is_refused(env, monkeypatch, repo_files):
    files = {**repo_files, "model.safetensors": repo_files["model.safetensors"][:-100]}
    with StandInHub("org/model", files) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(LlmoptError, match=r"model\.safetensors: truncated safetensors"):
            fetch_hub("m", entry(), env / "out", cache_dir=env / "cache")
    assert not (env / "out").exists()


def test_unknown_revision_and_repo(env, monkeypatch, repo_files):
    with StandInHub("org/model", repo_files) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(LlmoptError, match=r"org/model@v9: revision not found \(models.yaml: m.revision\)"):
            fetch_hub("m", entry("v9"), env / "out", cache_dir=env / "cache")
        with pytest.raises(LlmoptError, match=r"org/other@main: repository not found"):
            fetch_hub("m", {"hf_repo": "org/other", "revision": "main"}, env / "out", cache_dir=env / "cache")
    assert not (env / "out").exists()


def test_unreachable_hub(env, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(LlmoptError, match=r"hub unreachable and nothing cached"):
        fetch_hub("m", entry(), env / "out", cache_dir=env / "cache")


def test_entry_without_repo():
    with pytest.raises(LlmoptError, match=r"models.yaml: m needs 'hf_repo' and 'revision'"):
        fetch_hub("m", {"revision": "main"}, Path("/nonexistent"))
