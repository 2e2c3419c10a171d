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


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_tensors(path: Path) -> dict[str, tuple[list[int], int, int, int]]:
    """Walk a GGUF file's header and check it holds every tensor byte it promises.

    Returns ``{name: (dims, ggml type, absolute byte offset, byte size)}``. One-line LlmoptError for a missing file, a
    wrong magic, a damaged header or a truncated file. (A header walk, not gguf.GGUFReader, which decodes the
    262k-token vocabulary and takes ~40 s.)
    """
    import gguf

    if not path.is_file():
        raise LlmoptError(f"{path}: GGUF file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:

        def take(n: int) -> bytes:
            data = f.read(n)
            if len(data) < n:
                raise LlmoptError(f"{path}: truncated GGUF (ends inside the header at byte {f.tell()} of {size})")
            return data

        def u32() -> int:
            return struct.unpack("<I", take(4))[0]

        def u64() -> int:
            return struct.unpack("<Q", take(8))[0]

        def skip_value(kind: int) -> None:
            if kind in _GGUF_SCALARS:
                take(_GGUF_SCALARS[kind])
            elif kind == _GGUF_STRING:
                n = u64()
                if n > size:
                    raise LlmoptError(f"{path}: corrupt GGUF (string of {n} bytes at byte {f.tell()})")
                f.seek(n, 1)
            elif kind == _GGUF_ARRAY:
                item, count = u32(), u64()
                if item in _GGUF_SCALARS:
                    f.seek(_GGUF_SCALARS[item] * count, 1)
                else:
                    for _ in range(count):
                        skip_value(item)
            else:
                raise LlmoptError(f"{path}: corrupt GGUF (unknown value type {kind} at byte {f.tell()})")

        magic = f.read(4)
        if magic != b"GGUF":
            raise LlmoptError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        version, n_tensors, n_kv = u32(), u64(), u64()
        if version not in (2, 3) or n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise LlmoptError(f"{path}: corrupt GGUF header (version {version}, {n_tensors} tensors, {n_kv} keys)")
        alignment = 32
        for _ in range(n_kv):
            key = take(u64()).decode(errors="replace")
            kind = u32()
            if key == "general.alignment" and kind == 4:
                alignment = u32()
            else:
                skip_value(kind)
        end, table = 0, {}
        for _ in range(n_tensors):
            name = take(u64()).decode(errors="replace")
            dims = [u64() for _ in range(u32())]
            qtype, offset = u32(), u64()
            try:
                block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
            except (ValueError, KeyError):
                raise LlmoptError(f"{path}: corrupt GGUF (unknown tensor type {qtype})") from None
            count = 1
            for d in dims:
                count *= d
            table[name] = (dims, qtype, offset, count // block * block_bytes)
            end = max(end, offset + table[name][3])
        data_start = -(-f.tell() // alignment) * alignment
    if data_start + end > size:
        raise LlmoptError(f"{path}: truncated GGUF ({size} bytes, its tensors need {data_start + end})")
    return {name: (dims, qtype, data_start + offset, nbytes) for name, (dims, qtype, offset, nbytes) in table.items()}


def check_gguf(path: Path) -> None:
    """One-line LlmoptError unless ``path`` is a complete GGUF file (see ``gguf_tensors``)."""
    gguf_tensors(path)


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
