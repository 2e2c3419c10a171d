"""Architecture-faithful random weights for the registry's models, at real (``full``) or shrunken (``tiny``) shapes.

    llmopt download qwen2.5-7b-instruct --scale tiny -o /tmp/qwen-tiny
    python -c "from llmopt.download.synthetic import write_synthetic; ..."

The config comes from ``config/models.yaml``: ``architecture`` holds the model's Hugging Face config keys at full
scale (transformers-5 layout), ``tiny`` overrides some of them (deep-merged) so every family feature survives (GQA
ratio, sliding windows smaller than a test sequence, softcaps, QK-norm, local/global layer patterns, M-RoPE sections,
the vision tower) at widths that run in seconds on 2 cores. The config is built with transformers' own config class
and the tensor names and shapes are read off a meta-device model of transformers' own model class (so the folder is
what ``from_pretrained`` expects; names as a real checkpoint stores them, e.g. Qwen2.5-VL's ``visual.*`` and
``model.layers.*``); nothing is materialised but one chunk of one tensor at a time, streamed straight into sharded
safetensors files (bfloat16, like the real checkpoints), so a 32B model needs ~100 MB of RAM, not 64 GB.

Values: normal(mean, 0.02) per tensor; RMSNorm weights centred on their neutral value (1 for Qwen, 0 for Gemma whose
norms multiply by 1 + w). Every chunk of 1M values of a tensor has its own numpy PCG64 stream seeded by
(seed, sha256(name), chunk index), so chunks are drawn in parallel threads and a rerun is byte-identical whatever
the thread count or tensor order. Tiny models get a byte-level tokenizer
(``byte_tokenizer``: 256 byte tokens + the family's special tokens and chat template) so text prompts work.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from llmopt.download.manifest import folder_manifest
from llmopt.download.pip_gguf import GEMMA_CHAT_TEMPLATE
from llmopt.errors import LlmoptError
from llmopt.fsutil import atomic_path, write_json

# family -> (transformers config class, model class)
FAMILIES = {
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
}
INIT_STD = 0.02
CHUNK = 1 << 20  # values per seeded stream; fixed, so the bytes never depend on thread count or memory
SHARD_BYTES = 2 << 30


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` applied; nested dicts merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def architecture(entry: dict, scale: str) -> dict:
    """The HF config keys of a registry entry at ``scale`` (``full`` or ``tiny``)."""
    if scale not in ("full", "tiny"):
        raise LlmoptError(f"scale '{scale}': synthetic weights exist at 'full' or 'tiny'")
    if "architecture" not in entry:
        raise LlmoptError("models.yaml: entry has no 'architecture' block (needed for synthetic weights)")
    if scale == "full":
        return copy.deepcopy(entry["architecture"])
    if "tiny" not in entry:
        raise LlmoptError("models.yaml: entry has no 'tiny' block (needed for scale: tiny)")
    # the byte tokenizer's special ids replace the real ones, which lie outside the tiny vocabulary
    return deep_merge(deep_merge(entry["architecture"], tiny_token_ids(entry.get("family", ""))), entry["tiny"])


def build_config(entry: dict, scale: str):
    """transformers config object for the entry at ``scale``, saved with dtype bfloat16 and its architectures."""
    import transformers

    family = entry.get("family")
    if family not in FAMILIES:
        raise LlmoptError(f"models.yaml: family '{family}' has no synthetic builder (expected one of {', '.join(FAMILIES)})")
    config_cls, model_cls = (getattr(transformers, name) for name in FAMILIES[family])
    try:
        config = config_cls(**architecture(entry, scale))
    except (TypeError, ValueError) as err:
        raise LlmoptError(f"models.yaml: architecture of family '{family}' rejected by transformers: {err}") from None
    config.architectures = [model_cls.__name__]
    config.dtype = "bfloat16"
    return config


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(checkpoint name, shape) of every stored tensor, read off a meta-device model; tied copies left out."""
    import torch
    import transformers
    from transformers.core_model_loading import dot_natural_key, revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model_cls = getattr(transformers, config.architectures[0])
    with torch.device("meta"):
        model = model_cls(config)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    state = revert_weight_conversion(model, state)  # internal names -> the names real checkpoints store
    return [(name, tuple(state[name].shape)) for name in sorted(state, key=dot_natural_key)]


def init_stats(name: str, family: str) -> tuple[float, float]:
    """(mean, std) of a tensor's random values: norms near their neutral value, everything else N(0, 0.02)."""
    if "norm" in name and name.endswith(".weight") and ".proj." not in name:
        return (0.0 if family.startswith("gemma") else 1.0), INIT_STD
    return 0.0, INIT_STD


def chunk_bytes(name: str, index: int, count: int, mean: float, std: float, seed: int) -> bytes:
    """Chunk ``index`` (``count`` values) of a tensor as bfloat16 little-endian bytes, from its own seeded stream."""
    import torch

    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    values = np.random.default_rng([seed, digest, index]).standard_normal(count, dtype=np.float32)
    values *= np.float32(std)  # in place: one float32 buffer per chunk in flight
    values += np.float32(mean)
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def chunk_tasks(name: str, shape: tuple[int, ...], family: str, seed: int) -> list[tuple]:
    """The (name, index, count, mean, std, seed) arguments of every chunk of a tensor, in file order."""
    total = int(np.prod(shape, dtype=np.int64))
    mean, std = init_stats(name, family)
    return [(name, i, min(CHUNK, total - start), mean, std, seed) for i, start in enumerate(range(0, total, CHUNK))]


def parallel_chunks(tasks: list[tuple], workers: int) -> Iterator[bytes]:
    """``chunk_bytes`` of every task, in order, computed ``workers`` at a time (numpy and torch release the GIL);
    at most 2 x workers chunks are in memory."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(chunk_bytes, *task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensors (in order) into shards of at most ``shard_bytes`` (a bigger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for name, shape in specs:
        nbytes = 2 * int(np.prod(shape, dtype=np.int64))
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_safetensors_stream(path: Path, specs: list[tuple[str, tuple[int, ...]]], data: Iterator[bytes],
                             progress=None) -> str:
    """Write a bfloat16 safetensors file of ``specs`` whose data (all tensors, in order) arrive as byte chunks;
    return the file's sha256."""
    header, offset = {}, 0
    for name, shape in specs:
        nbytes = 2 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for piece in (struct.pack("<Q", len(blob)), blob):
            f.write(piece)
            digest.update(piece)
        for piece in data:
            f.write(piece)
            digest.update(piece)
            if progress is not None:
                progress.update(len(piece))
        if f.tell() != 8 + len(blob) + offset:
            raise LlmoptError(f"{path}: wrote {f.tell()} bytes, the header promises {8 + len(blob) + offset}")
    return digest.hexdigest()


def byte_tokenizer(family: str, vocab_size: int):
    """A byte-level tokenizer (PreTrainedTokenizerFast) with the family's special tokens and chat template.

    ids 0-3: <pad> <eos> <bos> <unk> (Gemma's own ids), 4-259: the 256 bytes, then the family's turn markers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = [_BYTE_CHARS[b] for b in range(256)]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    turns = (["<start_of_turn>", "<end_of_turn>"] if family.startswith("gemma")
             else ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    vocab = {tok: i for i, tok in enumerate(specials + byte_chars + turns)}
    if len(vocab) > vocab_size:
        raise LlmoptError(f"models.yaml: tiny vocab_size {vocab_size} < {len(vocab)} byte-tokenizer tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials + turns)
    template = GEMMA_CHAT_TEMPLATE if family.startswith("gemma") else CHATML_TEMPLATE
    bos = "<bos>" if family.startswith("gemma") else None
    eos = "<end_of_turn>" if family.startswith("gemma") else "<|im_end|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<pad>",
                                   unk_token="<unk>", chat_template=template, add_bos_token=bos is not None)


CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of the ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


_BYTE_CHARS = _byte_chars()


def tiny_token_ids(family: str) -> dict:
    """Special token ids of the byte tokenizer, for the tiny config (so they fall inside the tiny vocabulary)."""
    if family.startswith("gemma"):
        return {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    ids = {"pad_token_id": 0, "eos_token_id": 261, "bos_token_id": None}
    if family == "qwen2_5_vl":
        return {"text_config": ids, "vision_start_token_id": 262, "vision_end_token_id": 263,
                "image_token_id": 264, "video_token_id": 265}
    return ids


def write_synthetic(model_id: str, entry: dict, out_dir: Path, scale: str, seed: int = 0,
                    shard_bytes: int = SHARD_BYTES) -> dict:
    """Write the model folder (config, safetensors, tokenizer at tiny scale, manifest) atomically; return the manifest."""
    import transformers
    from tqdm import tqdm

    config = build_config(entry, scale)
    family = entry["family"]
    specs = tensor_specs(config)
    shards = plan_shards(specs, shard_bytes)
    total = sum(2 * int(np.prod(s, dtype=np.int64)) for _, s in specs)

    workers = max(1, min(16, len(os.sched_getaffinity(0))))
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        config.save_pretrained(tmp)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"synthetic {model_id} ({scale})",
                  disable=total < (256 << 20)) as bar:
            for name, shard in zip(names, shards):
                tasks = [task for t, shape in shard for task in chunk_tasks(t, shape, family, seed)]
                write_safetensors_stream(tmp / name, shard, parallel_chunks(tasks, workers), bar)
        if len(shards) > 1:
            weight_map = {t: name for name, shard in zip(names, shards) for t, _ in shard}
            write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
        if scale == "tiny":
            vocab = getattr(config, "text_config", config).vocab_size
            byte_tokenizer(family, vocab).save_pretrained(tmp)
        provenance = {
            "family": family, "hf_repo": entry.get("hf_repo"), "seed": seed, "dtype": "bfloat16",
            "init": f"normal(mean, {INIT_STD}) per tensor; norms at their neutral value (1, or 0 for Gemma's 1+w)",
            "generator": "numpy PCG64 seeded by (seed, sha256(tensor name)), float32 -> bfloat16",
            "tokenizer": "byte-level (256 bytes + family specials)" if scale == "tiny" else None,
            "transformers": transformers.__version__, "parameters": total // 2,
        }
        manifest = folder_manifest(tmp, model_id, "synthetic", scale, provenance)
        write_json(tmp / "manifest.json", manifest)
    return manifest
