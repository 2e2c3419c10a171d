"""Backends by name. Each module implements ``llmopt.backends.base.Backend`` and a ``probe() -> dict``.

``probe()`` returns ``{"present": bool, "reason": str, "device": {...}, "features": {...}}``: whether the target
can run here and, when not, exactly what is missing. Modules are imported lazily so a missing optional
dependency (vulkan, pyxrt, iree) affects only its own target.
"""

from __future__ import annotations

import importlib

from llmopt.errors import LlmoptError

# target name -> (module, Backend class)
BACKENDS = {
    "cpu": ("llmopt.backends.cpu", "CpuBackend"),
    "cuda": ("llmopt.backends.cuda", "CudaBackend"),
    "vulkan": ("llmopt.backends.vulkan", "VulkanBackend"),
    "iree-cpu": ("llmopt.backends.npu.iree_cpu", "IreeCpuBackend"),
    "npu": ("llmopt.backends.npu.xrt", "NpuBackend"),
}


def _module(target: str):
    if target not in BACKENDS:
        raise LlmoptError(f"unknown target '{target}' (expected one of {', '.join(BACKENDS)})")
    return importlib.import_module(BACKENDS[target][0])


def get_backend(target: str, **options):
    """Construct the backend for ``target``; raises LlmoptError with the reason when it cannot run here."""
    return getattr(_module(target), BACKENDS[target][1])(**options)


def probe(target: str) -> dict:
    """The target's probe record (never raises for an absent device: ``present`` is False with a reason)."""
    return _module(target).probe()
