"""The quantize stage on the real Gemma 3 270M: packed output, per-tensor errors and perplexity against float.

Perplexity here uses 512 Hamlet tokens (one window) to stay affordable; the full 4096-token protocol runs in
bench/quant_quality.py. Tolerances: int8 per channel within +1% of float; calibrated int4 g128 (GPTQ, asym) within
+25% on this single window (bench: +13% on 1024 tokens; RTN sym int4 is far worse here, see docs/benchmarks.md).
"""

from __future__ import annotations

import pytest
import torch

from llmopt.quant.format import QuantizedTensor
from llmopt.quant.io import load_folder
from llmopt.quant.pipeline import quantize_model

pytestmark = pytest.mark.slow
PPL = {"texts": ["hamlet"], "tokens": 512}


def test_w8_real_model(reference_model_dir, tmp_path):
    q = quantize_model(reference_model_dir, {"name": "w8", "method": "rtn", "bits": 8, "perplexity": PPL},
                       tmp_path / "w8", {})
    tensors = load_folder(tmp_path / "w8")
    assert isinstance(tensors["model.embed_tokens.weight"], QuantizedTensor)
    assert len(q["tensors"]) == len(tensors)
    assert all(t["rel_error"] < 0.02 for t in q["tensors"].values() if "bits" in t)
    ppl = q["perplexity"]
    assert ppl["quant"]["hamlet"] <= ppl["float"]["hamlet"] * 1.01
    assert (tmp_path / "w8" / "tokenizer.json").exists() and (tmp_path / "w8" / "config.json").exists()


def test_gptq_int4_real_model(reference_model_dir, tmp_path):
    scheme = {"name": "w4g128-gptq", "method": "gptq", "bits": 4, "group": 128, "sym": False, "perplexity": PPL,
              "calibration": {"tokens": 1024}}
    q = quantize_model(reference_model_dir, scheme, tmp_path / "q", {})
    ppl = q["perplexity"]
    assert q["calibration"]["used_for"] == ["hessians"] and "hamlet" not in q["calibration"]["texts"]
    assert ppl["quant"]["hamlet"] <= ppl["float"]["hamlet"] * 1.25
    assert q["tensors"]["model.embed_tokens.weight"]["method"] == "gptq"  # the tied table, by GPTQ as the head


def test_tuned_real_model(reference_model_dir, tmp_path):
    """End-to-end tuning on the real model (the preset's window and learning rate, 10 steps to stay affordable):
    the calibration KL and the Hamlet perplexity both drop against the same scheme untuned; every code unchanged;
    the tuned norm gains are written in the source's dtype."""
    base = {"name": "m", "method": "mse", "bits": 4, "group": 128, "sym": False, "perplexity": PPL,
            "calibration": {"tokens": 1280}}
    plain = quantize_model(reference_model_dir, base, tmp_path / "plain", {})
    tuned = quantize_model(reference_model_dir, {**base, "tune": {"steps": 10, "norms": True}}, tmp_path / "tuned", {})
    assert tuned["tune"]["kl_after"] < tuned["tune"]["kl_before"]
    assert tuned["perplexity"]["quant"]["hamlet"] < plain["perplexity"]["quant"]["hamlet"]
    a, b = load_folder(tmp_path / "plain"), load_folder(tmp_path / "tuned")
    for name, t in a.items():
        if isinstance(t, QuantizedTensor):
            assert (b[name].qweight == t.qweight).all(), name
            assert "rel_error_before_tune" in tuned["tensors"][name]
    norm = "model.layers.0.input_layernorm.weight"
    assert b[norm].dtype == a[norm].dtype and not torch.equal(b[norm], a[norm])
