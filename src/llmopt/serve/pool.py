"""The model pool behind the server: lazy loading, LRU eviction, hot-swap on changed weights.

A model is known by name (``{model}/{scheme}`` for a quantized folder, ``{model}`` for its source folder) and
loaded on first use. At most ``max_loaded`` models stay in memory; asking for another evicts the least recently
used. Before each use the folder's fingerprint (size and mtime of config.json and every safetensors file) is
compared with the loaded one; when the workflow rewrites a model (a new quantization landed), the new weights are
loaded and swapped in while requests already running finish on the old ones.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from llmopt.errors import LlmoptError


def discover_models(results: Path) -> dict[str, Path]:
    """Every servable folder under a workflow results tree: ``{model}`` sources and ``{model}/{scheme}`` quants."""
    results = Path(results)
    found: dict[str, Path] = {}
    for config in sorted(results.glob("*/source/config.json")):
        found[config.parent.parent.name] = config.parent
    for config in sorted(results.glob("*/*/quant/config.json")):
        found[f"{config.parent.parent.parent.name}/{config.parent.parent.name}"] = config.parent
    return found


def fingerprint(folder: Path) -> tuple:
    files = [folder / "config.json", *sorted(folder.glob("*.safetensors"))]
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists())


@dataclass
class Loaded:
    model: object
    fingerprint: tuple
    lock: threading.Lock = field(default_factory=threading.Lock)  # the engine runs one request at a time


class ModelPool:
    def __init__(self, folders: dict[str, Path], backend: str = "cpu", max_loaded: int = 2, loader=None):
        if max_loaded < 1:
            raise LlmoptError(f"max_loaded must be >= 1, got {max_loaded}")
        for name, folder in folders.items():
            if not (Path(folder) / "config.json").is_file():
                raise LlmoptError(f"model '{name}': {folder} has no config.json")
        self.folders = {name: Path(folder) for name, folder in folders.items()}
        self.backend, self.max_loaded = backend, max_loaded
        self._loader = loader or self._load_engine
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self.swaps = 0

    def _load_engine(self, folder: Path):
        from llmopt.engine import load_model

        return load_model(folder, backend=self.backend)

    def names(self) -> list[str]:
        return sorted(self.folders)

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def get(self, name: str) -> Loaded:
        """The loaded model ``name`` (loading, evicting or hot-swapping as needed)."""
        if name not in self.folders:
            raise LlmoptError(f"unknown model '{name}' (served: {', '.join(self.names()) or 'none'})")
        folder = self.folders[name]
        with self._lock:
            current = self._loaded.get(name)
            stamp = fingerprint(folder)
            if current is not None and current.fingerprint == stamp:
                self._loaded.move_to_end(name)
                return current
            entry = Loaded(self._loader(folder), stamp)
            if current is not None:
                self.swaps += 1
            self._loaded[name] = entry
            self._loaded.move_to_end(name)
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
            return entry

    def unload(self, name: str) -> bool:
        with self._lock:
            return self._loaded.pop(name, None) is not None
