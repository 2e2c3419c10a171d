"""Model analysis: per layer and op, the weight bytes, FLOPs and KV-cache bytes of prefill and decode.

Everything is derived from the Hugging Face config, read exactly as the engine reads it
(``llmopt.engine.config.ModelArgs.from_hf``: windows, tied embeddings, QK-norm, biases), and a ``Precision``
(bits per weight of the quantized linears, bytes of float tensors and of the KV cache). Counts are exact for the
decoder (linears, norms, biases, embeddings, attention over the cache with sliding windows); the
vision towers (Gemma 3 SigLIP, Qwen2.5-VL ViT) are counted as weights plus FLOPs per image.

    llmopt analyze --all                         # the eight registry models at full scale, bf16 and 4-bit
    python -m llmopt.analysis config.json        # one config, table per op
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmopt.errors import LlmoptError

if TYPE_CHECKING:  # importing llmopt.engine loads the model code and torch: only from_hf needs it
    from llmopt.engine.config import ModelArgs


@dataclass(frozen=True)
class Precision:
    """Storage precision: ``linear_bpw`` for the quantized projection weights (scales included), ``embed_bpw``
    for the embedding / untied head, ``float_bytes`` for norms and biases, ``kv_bytes`` per cached element."""

    linear_bpw: float = 16.0
    embed_bpw: float = 16.0
    float_bytes: float = 2.0
    kv_bytes: float = 2.0
    name: str = "bf16"

    @classmethod
    def from_scheme(cls, scheme: dict, kv_bytes: float = 2.0) -> "Precision":
        """Bits per weight implied by a ``config.yaml`` scheme dict (rtn/gptq/awq style: bits + group scales)."""
        name = scheme.get("name", "?")
        if scheme.get("method", "none") == "none":
            return cls(name=name, kv_bytes=kv_bytes)
        if "bits" not in scheme:
            if "bpw" in scheme:  # mixed schemes state their average instead
                return cls(linear_bpw=float(scheme["bpw"]), name=name, kv_bytes=kv_bytes)
            raise LlmoptError(f"scheme '{name}': needs 'bits' (and 'group') or 'bpw' to estimate sizes")
        bits, group = float(scheme["bits"]), scheme.get("group")
        scale_bits = 16.0 * (1 if scheme.get("sym", True) else 2)
        bpw = bits + (scale_bits / float(group) if group else 0.0)
        embed_bpw = bpw if scheme.get("quantize_embeddings", False) else 16.0
        return cls(linear_bpw=bpw, embed_bpw=embed_bpw, name=name, kv_bytes=kv_bytes)


@dataclass(frozen=True)
class Arch:
    """The decoder exactly as the engine reads it (``ModelArgs``: windows, tied embeddings, QK-norm, biases) and
    the vision tower's weights and FLOPs per image."""

    args: ModelArgs
    vision: dict | None = None  # {"params", "flops_per_image", "tokens_per_image"}

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config") -> "Arch":
        from llmopt.engine.config import ModelArgs

        args = ModelArgs.from_hf(cfg, where=where)
        return cls(args, _vision(cfg, args))

    @classmethod
    def from_folder(cls, model_dir: str | Path) -> "Arch":
        """The architecture of a model folder (its ``config.json``)."""
        from llmopt.fsutil import read_json

        path = Path(model_dir) / "config.json"
        return cls.from_hf(read_json(path), where=str(path))

    @classmethod
    def from_entry(cls, entry: dict, model_id: str = "model") -> "Arch":
        """The full-scale architecture of a registry entry (``entry_config``)."""
        return cls.from_hf(entry_config(entry, model_id), where=f"models.yaml: {model_id}")


def _vision(cfg: dict, args: ModelArgs) -> dict | None:
    """Weights and FLOPs per image of the vision tower: SigLIP (Gemma 3, one 896x896 image, pooled to
    ``mm_tokens_per_image``) or the Qwen2.5-VL ViT (one 448x448 image, 2x2 merged)."""
    if args.vision is not None:  # Qwen2.5-VL ViT: RMSNorm, qkv/proj with bias, SwiGLU with bias, merger MLP
        v = args.vision
        h, f, n = v.hidden, v.ffn, v.depth
        patches = (448 // v.patch_size) ** 2
        merged = h * v.spatial_merge_size**2
        per_layer = (3 * h * h + 3 * h) + (h * h + h) + 2 * (h * f + f) + (f * h + h) + 2 * h
        params = n * per_layer + v.in_channels * v.temporal_patch_size * v.patch_size**2 * h + h
        params += merged * merged + merged + merged * v.out_hidden + v.out_hidden
        tokens = patches // v.spatial_merge_size**2
        flops = 2 * patches * (n * (4 * h * h + 3 * h * f) + 3 * v.temporal_patch_size * v.patch_size**2 * h)
        flops += n * 4 * patches * min(patches, (v.window_size // v.patch_size) ** 2) * h
        flops += 2 * tokens * (merged * merged + merged * v.out_hidden)
    elif args.family == "gemma3" and isinstance(cfg.get("vision_config"), dict):
        from transformers import SiglipVisionConfig  # fills SigLIP's defaults exactly as transformers does

        known = {k: x for k, x in cfg["vision_config"].items() if k != "model_type"}
        v = SiglipVisionConfig(**known)
        h, f, n = v.hidden_size, v.intermediate_size, v.num_hidden_layers
        patches = (v.image_size // v.patch_size) ** 2
        per_layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 4 * h  # LayerNorms with bias
        params = n * per_layer + v.num_channels * v.patch_size**2 * h + h + patches * h + 2 * h
        params += h * args.hidden + h  # multimodal projector + its soft-embedding norm
        tokens = int(cfg.get("mm_tokens_per_image", 256))
        flops = 2 * patches * (n * (4 * h * h + 2 * h * f) + 3 * v.patch_size**2 * h) + n * 4 * patches**2 * h
        flops += 2 * tokens * h * args.hidden
    else:
        return None
    return {"params": int(params), "flops_per_image": float(flops), "tokens_per_image": int(tokens)}


@dataclass
class Op:
    """One op of one unit. ``unit`` is "embed", "layer" or "head"; ``layer`` is the decoder layer index."""

    unit: str
    layer: int | None
    name: str
    kind: str  # linear | embedding | norm | attention | elementwise
    params: int
    weight_bytes: float
    flops_per_token: float = 0.0  # not counting attention over the cache
    kv_bytes_per_token: float = 0.0  # K and V written for one token (attention ops)
    attn_flops_per_pos: float = 0.0  # QK^T plus PV FLOPs per attended cache position
    window: int | None = None
    act_bytes_per_token: float = 0.0  # activation traffic (read + write) per token

    def decode(self, context: int) -> tuple[float, float]:
        """(FLOPs, bytes moved) for one decoded token at cache length ``context`` (batch 1)."""
        seen = min(context, self.window) if self.window else context
        flops = self.flops_per_token + self.attn_flops_per_pos * seen
        moved = self.weight_bytes_read(1) + self.kv_bytes_per_token * (seen + 1) + self.act_bytes_per_token
        return flops, moved

    def prefill(self, tokens: int) -> tuple[float, float]:
        """(FLOPs, bytes moved) for a prompt of ``tokens`` tokens from an empty cache (batch 1)."""
        if self.unit == "head":  # logits are computed for the last token only
            return self.flops_per_token, self.weight_bytes
        w = self.window or tokens
        attended = sum(min(t, w) for t in range(1, tokens + 1)) if self.attn_flops_per_pos else 0
        flops = self.flops_per_token * tokens + self.attn_flops_per_pos * attended
        moved = self.weight_bytes_read(tokens) + self.kv_bytes_per_token * tokens * 2
        return flops, moved + self.act_bytes_per_token * tokens

    def weight_bytes_read(self, tokens: int) -> float:
        """Every op reads its whole weight once per step, except the embedding (its rows count as activations)."""
        return 0.0 if self.kind == "embedding" else self.weight_bytes


@dataclass
class Analysis:
    """All ops of a model at one precision, with per-layer and whole-model summaries."""

    arch: Arch
    precision: Precision
    ops: list[Op] = field(default_factory=list)

    def units(self) -> list[tuple[str, int | None]]:
        return [("embed", None)] + [("layer", i) for i in range(self.arch.args.n_layers)] + [("head", None)]

    def unit_ops(self, unit: str, layer: int | None = None) -> list[Op]:
        return [op for op in self.ops if op.unit == unit and op.layer == layer]

    def _stored(self) -> list[Op]:
        """Ops whose weights are stored: a tied head reuses the embedding table."""
        tied = self.arch.args.tie_embeddings
        return [op for op in self.ops if not (op.unit == "head" and op.kind == "linear" and tied)]

    @property
    def params(self) -> int:
        """Decoder parameters (a tied head counted once) plus the vision tower."""
        return sum(op.params for op in self._stored()) + (self.arch.vision["params"] if self.arch.vision else 0)

    @property
    def weight_bytes(self) -> float:
        """Bytes stored (tied head stored once), vision tower at float precision."""
        vision = self.arch.vision["params"] * self.precision.float_bytes if self.arch.vision else 0
        return sum(op.weight_bytes for op in self._stored()) + vision

    def kv_bytes_per_token(self) -> float:
        return sum(op.kv_bytes_per_token for op in self.ops)

    def kv_cache_bytes(self, context: int) -> float:
        """KV-cache bytes at ``context`` tokens; sliding-window layers keep only their window."""
        return sum(op.kv_bytes_per_token * (min(context, op.window) if op.window else context) for op in self.ops)

    def totals(self, phase: str, n: int) -> tuple[float, float]:
        """(FLOPs, bytes) of a decode step at context ``n`` or of a prefill of ``n`` tokens."""
        pairs = [op.decode(n) if phase == "decode" else op.prefill(n) for op in self.ops]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    def table(self, prompt: int = 512, context: int = 576) -> list[dict]:
        """One row per op: the numbers the ``analyze`` command writes as CSV/JSON."""
        rows = []
        for op in self.ops:
            pf, pb = op.prefill(prompt)
            df, db = op.decode(context)
            rows.append({"unit": op.unit, "layer": op.layer, "op": op.name, "kind": op.kind, "params": op.params,
                         "weight_bytes": op.weight_bytes, "kv_bytes_per_token": op.kv_bytes_per_token,
                         "window": op.window, f"prefill{prompt}_flops": pf, f"prefill{prompt}_bytes": pb,
                         f"decode@{context}_flops": df, f"decode@{context}_bytes": db})
        return rows

    def summary(self, prompt: int = 512, context: int = 576) -> dict:
        pf, pb = self.totals("prefill", prompt)
        df, db = self.totals("decode", context)
        return {"params": self.params, "weight_bytes": self.weight_bytes, "precision": self.precision.name,
                "linear_bpw": self.precision.linear_bpw, "kv_bytes_per_token": self.kv_bytes_per_token(),
                "kv_cache_bytes_at_context": self.kv_cache_bytes(context), "prompt": prompt, "context": context,
                "prefill_flops": pf, "prefill_bytes": pb, "decode_flops_per_token": df,
                "decode_bytes_per_token": db, "vision": self.arch.vision}


def analyze(arch: Arch, precision: Precision = Precision()) -> Analysis:
    """Every op of the decoder with its parameters, bytes, FLOPs and KV traffic."""
    a, p = arch.args, precision
    q_out, kv_out = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    lin_b, flt_b, h, vocab = p.linear_bpw / 8.0, p.float_bytes, a.hidden, a.vocab_size
    act_b = 4.0  # activations are float32 between ops
    result = Analysis(arch, precision)
    ops = result.ops
    ops.append(Op("embed", None, "embed_tokens", "embedding", vocab * h, vocab * h * p.embed_bpw / 8.0,
                  flops_per_token=h, act_bytes_per_token=h * (p.embed_bpw / 8.0 + act_b)))  # one row per token

    def linear(i, name, n_in, n_out, bias=False):
        ops.append(Op("layer", i, name, "linear", n_in * n_out + (n_out if bias else 0),
                      n_in * n_out * lin_b + (n_out * flt_b if bias else 0), flops_per_token=2.0 * n_in * n_out,
                      act_bytes_per_token=(n_in + n_out) * act_b))

    def norm(i, name, width, per_token_width=None):
        ops.append(Op("layer", i, name, "norm", width, width * flt_b, flops_per_token=4.0 * (per_token_width or width),
                      act_bytes_per_token=2 * (per_token_width or width) * act_b))

    for i in range(a.n_layers):
        norm(i, "input_layernorm", h)
        linear(i, "q_proj", h, q_out, a.qkv_bias)
        linear(i, "k_proj", h, kv_out, a.qkv_bias)
        linear(i, "v_proj", h, kv_out, a.qkv_bias)
        if a.qk_norm:
            norm(i, "q_norm", a.head_dim, q_out)
            norm(i, "k_norm", a.head_dim, kv_out)
        ops.append(Op("layer", i, "rope", "elementwise", 0, 0.0, flops_per_token=3.0 * (q_out + kv_out),
                      act_bytes_per_token=2 * (q_out + kv_out) * act_b))
        ops.append(Op("layer", i, "attention", "attention", 0, 0.0, flops_per_token=5.0 * a.n_heads,
                      kv_bytes_per_token=2.0 * kv_out * p.kv_bytes, attn_flops_per_pos=4.0 * q_out,
                      window=a.windows[i], act_bytes_per_token=2 * q_out * act_b))
        linear(i, "o_proj", q_out, h)
        norm(i, "post_attention_layernorm", h)
        if a.sandwich_norm:
            norm(i, "pre_feedforward_layernorm", h)
        linear(i, "gate_proj", h, a.ffn)
        linear(i, "up_proj", h, a.ffn)
        ops.append(Op("layer", i, "gated_act", "elementwise", 0, 0.0, flops_per_token=10.0 * a.ffn,
                      act_bytes_per_token=3 * a.ffn * act_b))
        linear(i, "down_proj", a.ffn, h)
        if a.sandwich_norm:
            norm(i, "post_feedforward_layernorm", h)
    ops.append(Op("head", None, "norm", "norm", h, h * flt_b, flops_per_token=4.0 * h,
                  act_bytes_per_token=2 * h * act_b))
    head_bytes = vocab * h * p.embed_bpw / 8.0
    ops.append(Op("head", None, "lm_head", "linear", vocab * h, head_bytes, flops_per_token=2.0 * vocab * h,
                  act_bytes_per_token=(h + vocab) * act_b))
    return result


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_VISION = ("vision_tower", "visual", "multi_modal_projector", "vision_model")


def measured_unit_bytes(model_dir: str | Path) -> dict:
    """Bytes per unit ("embed", layer index, "head", "vision") read from the safetensors headers of a model folder
    (packed or float): the real sizes the partitioner budgets with. A tied head shares the embedding's bytes."""
    from llmopt.fsutil import read_json

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LlmoptError(f"{model_dir}: no *.safetensors files")
    sizes: dict = {}
    for path in files:
        with open(path, "rb") as f:
            try:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError):
                raise LlmoptError(f"{path}: not a safetensors file (bad header)") from None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            m = _LAYER.search(name)
            if any(v in name for v in _VISION):
                key = "vision"
            elif m:
                key = int(m.group(1))
            elif "embed_tokens" in name:
                key = "embed"
            else:  # final norm, lm_head
                key = "head"
            sizes[key] = sizes.get(key, 0) + (end - begin)
    cfg = read_json(model_dir / "config.json")
    sizes["tied"] = bool(cfg.get("tie_word_embeddings", cfg.get("text_config", {}).get("tie_word_embeddings", False)))
    return sizes


_ENTRY_TYPES = {"gemma3": "gemma3_text", "gemma2": "gemma2", "qwen2": "qwen2", "qwen2_5_vl": "qwen2_5_vl"}


def entry_config(entry: dict, model_id: str = "model") -> dict:
    """The full-scale HF config of a registry entry (``config/models.yaml``: ``family`` + ``architecture``, and
    ``vision`` facts for Gemma 3, whose SigLIP tower the registry describes beside the text decoder)."""
    arch, family = entry.get("architecture"), entry.get("family")
    if not isinstance(arch, dict) or family not in _ENTRY_TYPES:
        raise LlmoptError(f"models.yaml: {model_id}: needs 'family' (one of {sorted(_ENTRY_TYPES)}) and an "
                          f"'architecture' mapping")
    cfg = {"model_type": _ENTRY_TYPES[family], **arch}
    vision = entry.get("vision")
    if family == "gemma3" and isinstance(vision, dict) and vision.get("model", "siglip") == "siglip":
        vc = {k: v for k, v in vision.items() if k not in ("model", "mm_tokens_per_image")}
        cfg = {"model_type": "gemma3", "text_config": arch, "vision_config": vc,
               "mm_tokens_per_image": vision.get("mm_tokens_per_image", 256),
               "tie_word_embeddings": arch.get("tie_word_embeddings", True)}
    return cfg


def main(argv: list[str] | None = None) -> int:
    from llmopt.fsutil import read_json

    for path in argv if argv is not None else sys.argv[1:]:
        an = analyze(Arch.from_hf(read_json(path), where=path))
        for row in an.table():
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        print(json.dumps(an.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
