"""Where downloads and built reference models are cached, and the lock that keeps concurrent builders apart.

The cache root is ``$LLMOPT_CACHE`` (default ``~/.cache/llmopt``): ``reference/<id>/`` (built model folders),
``gguf/`` (assembled GGUF files), ``hub/`` (huggingface_hub's blob cache, which resumes interrupted downloads).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator


def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir`` if given, else ``$LLMOPT_CACHE``, else ``~/.cache/llmopt``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("LLMOPT_CACHE") or Path.home() / ".cache" / "llmopt")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if needed), released on exit, even on error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link when on the same file system (one copy of big weights on disk), else copy."""
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
