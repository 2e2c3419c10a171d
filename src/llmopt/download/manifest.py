"""Model-folder integrity: the manifest (source, provenance, sha256 per file) and file-format checks.

    python -c "from llmopt.download.manifest import verify_folder; verify_folder('results/gemma-3-270m/source')"

Every downloaded folder carries ``manifest.json`` (docs/ARCHITECTURE.md, "Model folder"). ``verify_folder`` re-hashes
every listed file and parses every safetensors header, so a truncated, corrupt or altered file is reported in one line
naming the file and what was expected, before any stage reads it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from llmopt.errors import LlmoptError
from llmopt.fsutil import read_json, sha256_file

SOURCES = ("hub", "pip-gguf", "synthetic")
SCALES = ("tiny", "full", "real")


def folder_manifest(folder: Path, model_id: str, source: str, scale: str, provenance: dict) -> dict:
    """The manifest of ``folder``: source, scale, provenance and the sha256 of every file in it."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}
    return {"model": model_id, "source": source, "scale": scale, "provenance": provenance, "files": files}


def is_complete(folder: Path, build_version: int | None = None) -> bool:
    """A finished folder: manifest.json present, every file it lists present (and of ``build_version``)."""
    try:
        data = read_json(folder / "manifest.json")
        files = data["files"]
        if build_version is not None and data["provenance"].get("build_version") != build_version:
            return False
    except (LlmoptError, KeyError, TypeError, AttributeError):
        return False
    return all((folder / name).is_file() for name in files)


def check_safetensors(path: Path) -> dict:
    """Parse a safetensors header and check the file holds every byte it promises; return the header."""
    size = path.stat().st_size if path.is_file() else -1
    if size < 0:
        raise LlmoptError(f"{path}: safetensors file not found")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LlmoptError(f"{path}: truncated safetensors ({size} bytes, expected an 8-byte header length)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise LlmoptError(f"{path}: corrupt safetensors (header length {length} exceeds file size {size})")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LlmoptError(f"{path}: corrupt safetensors (header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise LlmoptError(f"{path}: corrupt safetensors (header is not a JSON object)")
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise LlmoptError(f"{path}: corrupt safetensors (tensor entry without data_offsets)") from None
    if 8 + length + end != size:
        raise LlmoptError(f"{path}: truncated safetensors ({size} bytes, header promises {8 + length + end})")
    return header


def check_gguf(path: Path) -> None:
    """One-line LlmoptError if ``path`` is not a complete GGUF file (missing, wrong magic, truncated, corrupt)."""
    import gguf

    if not path.is_file():
        raise LlmoptError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise LlmoptError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as err:  # gguf raises ValueError/IndexError/struct errors on damaged files
        raise LlmoptError(f"{path}: corrupt or truncated GGUF ({type(err).__name__}: {err})") from None
    if end > path.stat().st_size:
        raise LlmoptError(f"{path}: truncated GGUF ({path.stat().st_size} bytes, tensors need {end})")


def verify_folder(folder: str | Path) -> dict:
    """Check a model folder against its manifest (every file present, sha256 equal, safetensors complete)."""
    folder = Path(folder)
    manifest = read_json(folder / "manifest.json")
    for key in ("model", "source", "scale", "files"):
        if key not in manifest:
            raise LlmoptError(f"{folder / 'manifest.json'}: missing field '{key}'")
    if manifest["source"] not in SOURCES:
        raise LlmoptError(f"{folder / 'manifest.json'}: source '{manifest['source']}' (expected one of {', '.join(SOURCES)})")
    if not (folder / "config.json").is_file():
        raise LlmoptError(f"{folder}: config.json missing")
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise LlmoptError(f"{path}: listed in manifest.json but missing")
        if name.endswith(".safetensors"):
            check_safetensors(path)
        got = sha256_file(path)
        if got != expected:
            raise LlmoptError(f"{path}: sha256 {got[:16]}... does not match manifest.json ({expected[:16]}...)")
    return manifest
