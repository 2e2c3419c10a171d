"""Model folders tensor by tensor: read a (sharded) safetensors source, write packed shards, load a packed folder.

A model folder holds ``model.safetensors`` or ``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``
(docs/ARCHITECTURE.md). Reading opens the file per tensor, so only one tensor is resident at a time; writing
collects tensors into shards of at most ``shard_bytes`` and writes each with ``format.save_packed``.

    python -m llmopt.quant.io FOLDER      # lists the folder's tensors, packed or float
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from llmopt.errors import LlmoptError
from llmopt.quant.format import QuantizedTensor, load_packed, save_packed

INDEX = "model.safetensors.index.json"


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files, in index order."""
    folder = Path(folder)
    if (folder / INDEX).exists():
        from llmopt.fsutil import read_json

        index = read_json(folder / INDEX)
        if not isinstance(index.get("weight_map"), dict):
            raise LlmoptError(f"{folder / INDEX}: field 'weight_map' missing or not an object")
        files = sorted(set(index["weight_map"].values()))
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise LlmoptError(f"{folder / INDEX}: shard {missing[0]} listed in the index is missing")
        return [folder / f for f in files]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    raise LlmoptError(f"{folder}: no model.safetensors or {INDEX}")


def tensor_index(folder: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """``{name: (file, dtype, shape)}`` for every tensor in the folder, read from the headers only."""
    index = {}
    for path in weight_files(folder):
        header = _header(path)
        for name, info in header.items():
            if name != "__metadata__":
                index[name] = (path, info["dtype"], tuple(info["shape"]))
    return index


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file size (catches truncated files)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length exceeds the file")
            header = json.loads(f.read(n))
        end = max((info["data_offsets"][1] for k, info in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError(f"file is {size} bytes, its header describes {8 + n + end}")
    except FileNotFoundError:
        raise LlmoptError(f"{path}: file not found") from None
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LlmoptError(f"{path}: corrupt safetensors file ({err})") from None
    return header


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor from one file (the file is opened, read and closed)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as err:
        raise LlmoptError(f"{path}: cannot read tensor '{name}' ({err})") from None


class ShardWriter:
    """Writes tensors into ``model.safetensors`` or numbered shards + index, ``shard_bytes`` at most per shard."""

    def __init__(self, folder: Path, shard_bytes: int, metadata: dict | None = None) -> None:
        self.folder, self.shard_bytes, self.metadata = Path(folder), shard_bytes, metadata or {}
        self.pending: dict[str, QuantizedTensor | torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, list[str]]] = []  # per shard: tensor name -> stored entry names
        self.total_bytes = 0

    def add(self, name: str, tensor: QuantizedTensor | torch.Tensor) -> None:
        size = _nbytes(tensor)
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        i = len(self.shards)
        save_packed(self.folder / f"shard-{i:05d}.tmp.safetensors", self.pending, self.metadata)
        self.shards.append({n: _entries(n, t) for n, t in self.pending.items()})
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, name the files, write the index if sharded; returns the file names."""
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for i, name in enumerate(names):
            (self.folder / f"shard-{i:05d}.tmp.safetensors").rename(self.folder / name)
        if count > 1:
            from llmopt.fsutil import write_json

            weight_map = {e: names[i] for i, shard in enumerate(self.shards) for entries in shard.values() for e in entries}
            write_json(self.folder / INDEX, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return names


def _nbytes(t: QuantizedTensor | torch.Tensor) -> int:
    return t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * t.element_size()


def _entries(name: str, t: QuantizedTensor | torch.Tensor) -> list[str]:
    if not isinstance(t, QuantizedTensor):
        return [name]
    return [f"{name}.qweight", f"{name}.scales"] + ([] if t.zeros is None else [f"{name}.zeros"])


def load_folder(folder: Path) -> dict[str, QuantizedTensor | torch.Tensor]:
    """Every tensor of a packed (or float) model folder, packed ones as QuantizedTensor."""
    tensors: dict[str, QuantizedTensor | torch.Tensor] = {}
    for path in weight_files(folder):
        tensors.update(load_packed(path))
    return tensors


def main(argv: list[str] | None = None) -> int:
    from llmopt.quant.format import main as describe

    for folder in argv if argv is not None else sys.argv[1:]:
        for path in weight_files(Path(folder)):
            describe([str(path)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
