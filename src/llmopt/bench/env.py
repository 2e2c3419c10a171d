"""The environment a benchmark ran in: hardware (from the probe and the OS) and software versions."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
from pathlib import Path

PACKAGES = ("torch", "transformers", "numpy", "safetensors", "llama_cpp_python", "vulkan", "iree-base-runtime",
            "llmopt")


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())
    except OSError:
        return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(probe: dict | None = None) -> dict:
    import psutil
    import torch

    env = {
        "host": platform.node(), "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "ram_bytes": psutil.virtual_memory().total, "packages": {p: _version(p) for p in PACKAGES},
        "git_commit": _git_commit(),
    }
    if torch.cuda.is_available():
        env["cuda"] = {"device": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    if probe:
        env["target_device"] = probe.get("device")
        env["target_features"] = probe.get("features")
    return env
