"""Reading a model folder's weights: safetensors (float or llmopt packed), canonical names, checked shapes.

Hugging Face checkpoints name the same decoder tensor differently by family and transformers version
(``model.layers.0...``, ``language_model.model.layers.0...``, ``model.language_model.layers.0...``; Qwen2.5-VL's
tower as ``visual.`` or ``model.visual.``). ``canonical_name`` maps them all onto one scheme: ``embed_tokens.weight``,
``layers.{i}.self_attn.q_proj.weight``, ``norm.weight``, ``lm_head.weight``, ``visual.blocks.{i}...``.
``expected_shapes(args)`` lists every tensor the decoder needs, so a missing or misshapen tensor is reported by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmopt.engine.config import ModelArgs
from llmopt.errors import LlmoptError
from llmopt.quant.format import QuantizedTensor, load_packed

_PREFIXES = (  # (prefix, replacement), first match wins
    ("model.language_model.", ""),
    ("language_model.model.", ""),
    ("language_model.", ""),
    ("model.visual.", "visual."),
    ("model.", ""),
)
_IGNORED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def canonical_name(name: str) -> str | None:
    """The canonical tensor name, or None for tensors the engine does not use (Gemma 3's SigLIP tower)."""
    if name.startswith(_IGNORED):
        return None
    for prefix, repl in _PREFIXES:
        if name.startswith(prefix):
            return repl + name[len(prefix):]
    return name


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (single file or sharded with an index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise LlmoptError(f"{index}: expected a JSON object with a 'weight_map'") from None
        files = [folder / s for s in shards]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise LlmoptError(f"{index}: shard file(s) missing: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise LlmoptError(f"{folder}: no model.safetensors (or shards with model.safetensors.index.json)")
    return found


def load_tensors(folder: Path) -> dict[str, QuantizedTensor | torch.Tensor]:
    """All tensors of the folder under canonical names (packed ones as QuantizedTensor)."""
    tensors: dict[str, QuantizedTensor | torch.Tensor] = {}
    for path in weight_files(folder):
        for name, t in load_packed(path).items():
            canon = canonical_name(name)
            if canon is not None:
                tensors[canon] = t
    return tensors


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every decoder tensor the engine reads, with its shape (vision tower excluded: see vision.py)."""
    h, hd, q_out, kv_out = args.hidden, args.head_dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (args.vocab_size, h), "norm.weight": (h,)}
    if not args.tie_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, h)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q_out, h),
            p + "self_attn.k_proj.weight": (kv_out, h),
            p + "self_attn.v_proj.weight": (kv_out, h),
            p + "self_attn.o_proj.weight": (h, q_out),
            p + "mlp.gate_proj.weight": (args.ffn, h),
            p + "mlp.up_proj.weight": (args.ffn, h),
            p + "mlp.down_proj.weight": (h, args.ffn),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
        if args.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q_out,), p + "self_attn.k_proj.bias": (kv_out,),
                           p + "self_attn.v_proj.bias": (kv_out,)})
        if args.sandwich_norm:
            shapes.update({p + "pre_feedforward_layernorm.weight": (h,), p + "post_feedforward_layernorm.weight": (h,)})
        if args.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    return shapes


def check_tensors(tensors: dict, shapes: dict[str, tuple[int, ...]], folder: Path) -> None:
    """LlmoptError naming the first missing tensor or the first with a wrong shape."""
    for name, shape in shapes.items():
        t = tensors.get(name)
        if t is None:
            raise LlmoptError(f"{folder}: tensor '{name}' is missing (expected shape {list(shape)})")
        got = tuple(t.shape)
        if got != shape:
            raise LlmoptError(f"{folder}: tensor '{name}' has shape {list(got)}, expected {list(shape)}")
