"""Tiny real models for the issue-7 tests (partition, bench, report): a random transformers model saved as a
float source folder, and its 4-bit packed copy written with llmopt.quant.format, laid out as the workflow does
(``root/{model}/source``, ``root/{model}/{scheme}/quant``). Imported by test_partition/test_bench/test_report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FAMILIES = {
    "qwen2": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=384, max_position_embeddings=1024, tie_word_embeddings=False),
    "gemma2": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, vocab_size=384, max_position_embeddings=1024,
                   sliding_window=8, query_pre_attn_scalar=32, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
}


def rtn_int4(w: torch.Tensor, group: int = 32):
    """Symmetric 4-bit round-to-nearest, group-wise fp16 scales, in the packed format."""
    from llmopt.quant.format import QuantizedTensor, pack_bits

    out, n_in = w.shape
    wg = w.float().view(out, n_in // group, group)
    scale = (wg.abs().amax(-1, keepdim=True) / 7.0).clamp_min(1e-8)
    codes = (torch.round(wg / scale).clamp(-8, 7) + 8).to(torch.uint8).view(out, n_in)
    return QuantizedTensor(pack_bits(codes, 4), scale.squeeze(-1).half(), None, 4, group, (out, n_in))


def build_tiny(root: Path, model: str = "tiny-qwen", family: str = "qwen2", scheme: str = "w4") -> tuple[Path, Path]:
    """Write ``root/model/source`` (float32 safetensors) and ``root/model/scheme/quant`` (packed int4)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmopt.quant.format import save_packed

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, **FAMILIES[family])
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    source = root / model / "source"
    hf.save_pretrained(source)
    (source / "manifest.json").write_text(json.dumps({"model": model, "source": "synthetic", "scale": "tiny"}))
    tensors = {k: rtn_int4(v) if v.dim() == 2 and "embed" not in k and "lm_head" not in k else v.contiguous()
               for k, v in hf.state_dict().items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    quant = root / model / scheme / "quant"
    quant.mkdir(parents=True)
    save_packed(quant / "model.safetensors", tensors)
    shutil.copy(source / "config.json", quant / "config.json")
    (quant / "manifest.json").write_text(json.dumps({"model": model, "source": "synthetic", "scale": "tiny"}))
    return source, quant


def test_tiny_quant_folder_dequantizes_close_to_source(tmp_path):
    from safetensors.torch import load_file

    from llmopt.quant.format import QuantizedTensor, load_packed

    source, quant = build_tiny(tmp_path)
    ref = load_file(str(source / "model.safetensors"))
    packed = load_packed(quant / "model.safetensors")
    qts = {k: v for k, v in packed.items() if isinstance(v, QuantizedTensor)}
    assert len(qts) == 7 * 3  # q, k, v, o, gate, up, down per layer
    for name, qt in qts.items():
        w = ref[name].float()
        rel = float((qt.dequantize() - w).norm() / w.norm())
        assert rel < 0.15, name  # 4-bit RTN, group 32, on normal weights: ~0.1
