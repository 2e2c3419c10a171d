"""ModelArgs: one dataclass describing every supported decoder, read from a Hugging Face config.json.

Families: ``gemma2``, ``gemma3`` / ``gemma3_text`` (text decoder of the multimodal checkpoint), ``qwen2``
(Qwen2.5, QwQ) and ``qwen2_5_vl`` (text decoder plus ``VisionArgs`` for its ViT tower). Both config layouts are
read: transformers 5 (``rope_parameters``, per layer type for gemma3; nested ``text_config``) and the v4 layout
that hub checkpoints carry (``rope_theta``, ``rope_scaling``, ``rope_local_base_freq``, flat Qwen2.5-VL keys).

    python -m llmopt.engine.config path/to/config.json   # prints the parsed ModelArgs
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmopt.errors import LlmoptError

FAMILIES = ("gemma2", "gemma3", "qwen2", "qwen2_5_vl")
_MODEL_TYPES = {"gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3", "qwen2": "qwen2",
                "qwen2_5_vl": "qwen2_5_vl", "qwen2_5_vl_text": "qwen2_5_vl"}
# transformers' class defaults for keys that hub config.json files may leave out (a key present, even as null, wins)
_FAMILY_DEFAULTS = {
    "gemma2": {"vocab_size": 256000, "head_dim": 256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
               "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "sliding_window": 4096,
               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "tie_word_embeddings": True},
    "gemma3": {"vocab_size": 262208, "head_dim": 256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
               "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "sliding_window": 4096,
               "tie_word_embeddings": True},
    "qwen2": {"vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "hidden_act": "silu",
              "tie_word_embeddings": False},
    "qwen2_5_vl": {"vocab_size": 152064, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                   "rope_theta": 1_000_000.0, "tie_word_embeddings": False, "image_token_id": 151655,
                   "vision_start_token_id": 151652},
}
_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "silu": "silu",
         "swish": "silu"}


@dataclass(frozen=True)
class RopeArgs:
    """Rotary embedding of one layer type: ``inv_freq = 1 / (theta ** (2i / dim)) / factor``."""

    theta: float
    factor: float = 1.0  # linear position scaling ("linear" rope_type)
    mrope_section: tuple[int, ...] | None = None  # Qwen2.5-VL: frequency split over (t, h, w) positions


@dataclass(frozen=True)
class VisionArgs:
    """The Qwen2.5-VL vision tower."""

    depth: int
    hidden: int
    n_heads: int
    ffn: int
    out_hidden: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_blocks: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3
    act: str = "silu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads


@dataclass(frozen=True)
class ModelArgs:
    family: str
    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    norm_eps: float
    act: str  # gelu_tanh (GeGLU) or silu (SwiGLU)
    attn_scale: float
    windows: tuple[int | None, ...]  # per layer: sliding window in tokens, None = global
    rope_layers: tuple[RopeArgs, ...]  # per layer
    max_position: int
    tie_embeddings: bool
    qkv_bias: bool = False
    attn_softcap: float | None = None
    final_softcap: float | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    vision: VisionArgs | None = None
    image_token_id: int | None = None
    vision_start_token_id: int | None = None
    extra: dict = field(default_factory=dict, compare=False)

    # --- family traits (the model code reads these, never the family name) ---------------------------
    @property
    def is_gemma(self) -> bool:
        return self.family in ("gemma2", "gemma3")

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden) if self.is_gemma else 1.0

    @property
    def norm_unit_offset(self) -> bool:  # Gemma stores RMSNorm weights as w, applied as (1 + w)
        return self.is_gemma

    @property
    def sandwich_norm(self) -> bool:  # Gemma: extra norms after attention and after the FFN
        return self.is_gemma

    @property
    def qk_norm(self) -> bool:
        return self.family == "gemma3"

    @property
    def mrope(self) -> bool:
        return self.rope_layers[0].mrope_section is not None

    def param_count(self) -> int:
        """Decoder parameters (embedding counted once when tied; the vision tower excluded)."""
        attn = self.hidden * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        per_layer = attn + 3 * self.hidden * self.ffn + (4 if self.sandwich_norm else 2) * self.hidden
        head = 0 if self.tie_embeddings else self.vocab_size * self.hidden
        return self.vocab_size * self.hidden + self.n_layers * per_layer + head + self.hidden

    def to_json(self) -> dict:
        return asdict(self)

    # --- parsing --------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, config: dict, where: str = "config.json") -> "ModelArgs":
        """Parse a Hugging Face config dict (v4 or v5 layout); LlmoptError naming the field when unusable."""
        if not isinstance(config, dict):
            raise LlmoptError(f"{where}: expected a JSON object")
        top_type = config.get("model_type")
        if top_type not in _MODEL_TYPES:
            raise LlmoptError(f"{where}: model_type {top_type!r} is not supported "
                              f"(expected one of {', '.join(sorted(_MODEL_TYPES))})")
        family = _MODEL_TYPES[top_type]
        # Multimodal checkpoints nest the decoder in text_config (gemma3 always, qwen2_5_vl in v5); v4
        # Qwen2.5-VL keeps the text keys at the top level. Nested keys win over top-level ones.
        text = {**_FAMILY_DEFAULTS[family], **config}
        text.pop("text_config", None)
        if isinstance(config.get("text_config"), dict):
            text.update(config["text_config"])

        def req(key):
            if text.get(key) is None:
                raise LlmoptError(f"{where}: missing field '{key}' for model_type {top_type}")
            return text[key]

        hidden, n_heads = int(req("hidden_size")), int(req("num_attention_heads"))
        n_layers = int(req("num_hidden_layers"))
        n_kv = int(text.get("num_key_value_heads") or n_heads)
        head_dim = int(text.get("head_dim") or hidden // n_heads)
        if n_heads % n_kv:
            raise LlmoptError(f"{where}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
        act_name = text.get("hidden_activation") or text.get("hidden_act") or "gelu_pytorch_tanh"
        if act_name not in _ACTS:
            raise LlmoptError(f"{where}: activation {act_name!r} is not supported (expected one of {sorted(_ACTS)})")
        is_gemma = family in ("gemma2", "gemma3")
        if is_gemma:
            attn_scale = float(text.get("query_pre_attn_scalar") or head_dim) ** -0.5
        else:
            attn_scale = head_dim ** -0.5

        layer_types = _layer_types(text, family, n_layers, where)
        window = text.get("sliding_window")
        windows = tuple(int(window) if (t == "sliding_attention" and window) else None for t in layer_types)
        rope_layers = tuple(_rope_for(text, family, t, where) for t in layer_types)

        eos = text.get("eos_token_id", config.get("eos_token_id"))
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
        vision = None
        if family == "qwen2_5_vl":
            vision = _vision_args(config.get("vision_config"), hidden, where)
        tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
        return cls(
            family=family,
            vocab_size=int(req("vocab_size")),
            hidden=hidden,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            ffn=int(req("intermediate_size")),
            norm_eps=float(text["rms_norm_eps"]),
            act=_ACTS[act_name],
            attn_scale=attn_scale,
            windows=windows,
            rope_layers=rope_layers,
            max_position=int(text["max_position_embeddings"]),
            tie_embeddings=bool(tie),
            qkv_bias=family in ("qwen2", "qwen2_5_vl") or bool(text.get("attention_bias", False)),
            attn_softcap=_opt_float(text.get("attn_logit_softcapping")),
            final_softcap=_opt_float(text.get("final_logit_softcapping")),
            eos_token_ids=eos_ids,
            bos_token_id=_opt_int(text.get("bos_token_id", config.get("bos_token_id"))),
            pad_token_id=_opt_int(text.get("pad_token_id", config.get("pad_token_id"))),
            vision=vision,
            image_token_id=_opt_int(text.get("image_token_id")) if family == "qwen2_5_vl" else None,
            vision_start_token_id=_opt_int(text.get("vision_start_token_id")) if family == "qwen2_5_vl" else None,
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelArgs":
        folder = Path(folder)
        path = folder / "config.json"
        if not path.is_file():
            raise LlmoptError(f"{folder}: no config.json (expected a model folder with config.json and *.safetensors)")
        from llmopt.fsutil import read_json

        return cls.from_hf(read_json(path), where=str(path))


def _opt_float(v) -> float | None:
    return None if v is None else float(v)


def _opt_int(v) -> int | None:
    return None if v is None else int(v)


def _layer_types(text: dict, family: str, n_layers: int, where: str) -> list[str]:
    types = text.get("layer_types")
    if types is not None:
        if len(types) != n_layers or any(t not in ("sliding_attention", "full_attention") for t in types):
            raise LlmoptError(f"{where}: layer_types must list {n_layers} of 'sliding_attention'/'full_attention'")
        return list(types)
    if family == "gemma2":
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if family == "gemma3":
        pattern = int(text.get("sliding_window_pattern") or 6)
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    # qwen2: sliding only when use_sliding_window, on layers >= max_window_layers (HF's rule)
    if text.get("use_sliding_window") and text.get("sliding_window"):
        first = int(text.get("max_window_layers") or 0)
        return ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    return ["full_attention"] * n_layers


def _rope_dict(params: dict, where: str, theta_default: float) -> RopeArgs:
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta") or theta_default)
    section = params.get("mrope_section")
    if kind in ("default", "mrope"):
        return RopeArgs(theta, 1.0, tuple(int(s) for s in section) if section else None)
    if kind == "linear":
        return RopeArgs(theta, float(params.get("factor", 1.0)), tuple(section) if section else None)
    raise LlmoptError(f"{where}: rope_type {kind!r} is not supported (expected default, linear or mrope)")


def _rope_for(text: dict, family: str, layer_type: str, where: str) -> RopeArgs:
    params = text.get("rope_parameters")
    if family == "gemma3":
        defaults = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
        if isinstance(params, dict) and layer_type in params:  # v5: per layer type
            return _rope_dict(params[layer_type] or {}, where, defaults[layer_type])
        # v4: rope_theta + rope_scaling for global layers, rope_local_base_freq for sliding ones
        if layer_type == "sliding_attention":
            return RopeArgs(float(text.get("rope_local_base_freq") or defaults[layer_type]))
        scaling = dict(text.get("rope_scaling") or {})
        scaling.setdefault("rope_theta", text.get("rope_theta"))
        return _rope_dict(scaling, where, defaults[layer_type])
    default_theta = 10_000.0
    if isinstance(params, dict) and params:
        merged = {"rope_theta": text.get("rope_theta"), **params}
        return _rope_dict(merged, where, default_theta)
    scaling = dict(text.get("rope_scaling") or {})
    scaling.setdefault("rope_theta", text.get("rope_theta"))
    return _rope_dict(scaling, where, default_theta)


def _vision_args(vc: dict | None, text_hidden: int, where: str) -> VisionArgs:
    if not isinstance(vc, dict):
        raise LlmoptError(f"{where}: qwen2_5_vl needs a 'vision_config' object")
    try:
        hidden = int(vc["hidden_size"])
        rope = vc.get("rope_parameters") or {}
        return VisionArgs(
            depth=int(vc["depth"]),
            hidden=hidden,
            n_heads=int(vc["num_heads"]),
            ffn=int(vc["intermediate_size"]),
            out_hidden=int(vc.get("out_hidden_size") or text_hidden),
            patch_size=int(vc.get("patch_size", 14)),
            temporal_patch_size=int(vc.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vc.get("spatial_merge_size", 2)),
            window_size=int(vc.get("window_size", 112)),
            fullatt_blocks=tuple(int(i) for i in vc.get("fullatt_block_indexes", (7, 15, 23, 31))),
            in_channels=int(vc.get("in_channels", vc.get("in_chans", 3))),
            act=_ACTS.get(vc.get("hidden_act", "silu"), "silu"),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
        )
    except KeyError as err:
        raise LlmoptError(f"{where}: vision_config lacks '{err.args[0]}'") from None


def main(argv: list[str] | None = None) -> int:
    for path in argv if argv is not None else sys.argv[1:]:
        args = ModelArgs.from_hf(json.loads(Path(path).read_text()), where=path)
        print(json.dumps(args.to_json(), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
