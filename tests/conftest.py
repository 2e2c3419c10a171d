"""Shared pytest setup: fixed thread count (2-core machines), repository paths, the real reference model, fresh
random generators, and the backends the Vulkan test files share (those files skip themselves without a device)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def reference_model_dir() -> Path:
    """HF-style folder of the real Gemma 3 270M (built once from the pip GGUF, cached under ~/.cache/llmopt)."""
    from llmopt.download.pip_gguf import ensure_reference_model

    return ensure_reference_model()


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run


@pytest.fixture(scope="module")
def be():
    """One VulkanBackend per test module, closed after it."""
    from llmopt.backends.vulkan import VulkanBackend

    backend = VulkanBackend()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def cpu():
    """The CPU backend's float reference path, what Vulkan ops are checked against."""
    from llmopt.backends.cpu import CpuBackend

    return CpuBackend(quant="reference")
