"""Shared pytest setup: fixed thread count (2-core machines), repository paths, the real reference model."""

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
