"""Model-folder integrity: manifests, sha256 checks, truncated or corrupt safetensors/GGUF, fetch dispatch."""

from __future__ import annotations

import json
import struct

import pytest

from llmopt.download import effective_source, fetch
from llmopt.download.cache import file_lock
from llmopt.download.manifest import check_gguf, check_safetensors, verify_folder
from llmopt.errors import LlmoptError
from llmopt.registry import load

REG = load()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "source"
    fetch("qwen2.5-14b-instruct", REG.model("qwen2.5-14b-instruct"), out, "tiny")
    return out


@pytest.fixture
def copy(folder, tmp_path):
    import shutil

    dest = tmp_path / "copy"
    shutil.copytree(folder, dest)
    return dest


def test_fetch_writes_a_verified_folder(folder):
    manifest = verify_folder(folder)
    assert manifest["model"] == "qwen2.5-14b-instruct" and manifest["source"] == "synthetic"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])


def test_checksum_mismatch(copy):
    path = copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LlmoptError, match=r"model\.safetensors: sha256 [0-9a-f]{16}\.\.\. does not match manifest"):
        verify_folder(copy)


def test_truncated_and_corrupt_safetensors(copy):
    path = copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(LlmoptError, match=r"model\.safetensors: truncated safetensors \(\d+ bytes, header promises \d+\)"):
        verify_folder(copy)
    path.write_bytes(data[:5])
    with pytest.raises(LlmoptError, match="expected an 8-byte header length"):
        check_safetensors(path)
    path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(LlmoptError, match="header length 1099511627776 exceeds file size"):
        check_safetensors(path)
    path.write_bytes(struct.pack("<Q", 4) + b"{{{{" + b"\0" * 8)
    with pytest.raises(LlmoptError, match="header is not valid JSON"):
        check_safetensors(path)


def test_missing_files_and_bad_manifest(copy):
    (copy / "tokenizer.json").unlink()
    with pytest.raises(LlmoptError, match=r"tokenizer\.json: listed in manifest\.json but missing"):
        verify_folder(copy)
    (copy / "manifest.json").write_text(json.dumps({"model": "x", "source": "ftp", "scale": "tiny", "files": {}}))
    with pytest.raises(LlmoptError, match=r"manifest\.json: source 'ftp' \(expected one of hub, pip-gguf, synthetic\)"):
        verify_folder(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(LlmoptError, match=r"manifest\.json: not valid JSON"):
        verify_folder(copy)


def test_gguf_checks(tmp_path):
    bad = tmp_path / "x.gguf"
    with pytest.raises(LlmoptError, match="GGUF file not found"):
        check_gguf(bad)
    bad.write_bytes(b"GGML" + b"\0" * 64)
    with pytest.raises(LlmoptError, match=r"not a GGUF file \(magic b'GGML', expected b'GGUF'\)"):
        check_gguf(bad)


def test_truncated_gguf(tmp_path):
    """The real GGUF cut short: refused in one line (needs the assembled pip GGUF, built by the reference fixture)."""
    from llmopt.download.pip_gguf import assemble_gguf

    src = assemble_gguf()
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(50 << 20))
    with pytest.raises(LlmoptError, match=r"cut\.gguf: truncated GGUF \(52428800 bytes, its tensors need \d+\)") as err:
        check_gguf(cut)
    assert "\n" not in str(err.value)
    cut.write_bytes(src.read_bytes()[:2000])  # inside the metadata
    with pytest.raises(LlmoptError, match=r"cut\.gguf: truncated GGUF \(ends inside the header"):
        check_gguf(cut)


def test_effective_source():
    hub_entry, pip_entry = REG.model("qwen2.5-7b-instruct"), REG.model("gemma-3-270m")
    assert [effective_source(hub_entry, s) for s in ("tiny", "full", "real")] == ["synthetic", "synthetic", "hub"]
    assert {effective_source(pip_entry, s) for s in ("tiny", "full", "real")} == {"pip-gguf"}
    with pytest.raises(LlmoptError, match="scale 'small'"):
        effective_source(hub_entry, "small")
    with pytest.raises(LlmoptError, match="source 'ftp'"):
        effective_source({**hub_entry, "source": "ftp"}, "tiny")


def test_file_lock_excludes(tmp_path):
    """Two processes holding the same lock never overlap (the reference build relies on it)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hold, args=(tmp_path / "lock", tmp_path / "log", i)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    events = (tmp_path / "log").read_text().split()
    assert len(events) == 6
    for i in range(0, 6, 2):  # every "in" is followed by the same worker's "out"
        assert events[i].startswith("in") and events[i + 1] == "out" + events[i][2:]


def _hold(lock, log, i):
    import time

    with file_lock(lock):
        with open(log, "a") as f:
            f.write(f"in{i} ")
        time.sleep(0.2)
        with open(log, "a") as f:
            f.write(f"out{i} ")
