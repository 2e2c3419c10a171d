"""The quantize stage end to end on small synthetic folders: outputs, budgets, sharding, bad input, memory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from llmopt.errors import LlmoptError
from llmopt.quant.format import QuantizedTensor
from llmopt.quant.io import load_folder
from llmopt.quant.pipeline import quantize_model

HIDDEN, FFN, VOCAB = 128, 256, 384


def make_model(folder, extra: dict | None = None, layers: int = 2) -> dict:
    """A Qwen2-like synthetic folder (bf16 weights, biases, norms, untied head)."""
    gen = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "lm_head.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.q_proj.bias": (HIDDEN,),
              p + "mlp.up_proj.weight": (FFN, HIDDEN), p + "mlp.down_proj.weight": (HIDDEN, FFN),
              p + "input_layernorm.weight": (HIDDEN,)}
    tensors = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in t.items()}
    tensors |= extra or {}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": HIDDEN}))
    (folder / "manifest.json").write_text(json.dumps({"model": "toy", "source": "synthetic", "scale": "tiny", "files": {}}))
    return tensors


def test_rtn_output_folder(tmp_path):
    src = tmp_path / "src"
    tensors = make_model(src)
    q = quantize_model(src, {"name": "w4g128", "method": "rtn", "bits": 4, "group": 128}, tmp_path / "out", {})
    out = tmp_path / "out"
    assert {"config.json", "model.safetensors", "quant.json", "manifest.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "quant.json").read_text())["bytes"] == q["bytes"]
    loaded = load_folder(out)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        if t.dim() == 2:
            assert isinstance(loaded[name], QuantizedTensor) and loaded[name].bits == 4
            assert q["tensors"][name]["rel_error"] == pytest.approx(
                float((loaded[name].dequantize() - t.float()).norm() / t.float().norm()), rel=1e-5)
            assert q["tensors"][name]["rel_error"] < 0.15
        else:
            assert torch.equal(loaded[name], t)
    params = sum(t.numel() for t in tensors.values())
    assert q["params"] == params and q["bits_per_weight"] == pytest.approx(8 * q["bytes"] / params)
    assert 4.1 < q["bits_per_weight"] < 4.3 and q["compression"] == pytest.approx(16 / q["bits_per_weight"])
    assert q["perplexity"]["skipped"].startswith("synthetic")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "toy" and "model.safetensors" in manifest["files"]


@pytest.mark.parametrize("bpw", [2.7, 3.3, 5.0])
def test_mixed_hits_budget(tmp_path, bpw):
    src = tmp_path / "src"
    make_model(src)
    q = quantize_model(src, {"name": "m", "method": "mixed", "budget": {"bpw": bpw}, "base": "rtn"}, tmp_path / "out", {})
    assert q["bytes"] <= q["budget"]["bytes"] and q["bits_per_weight"] <= bpw
    assert q["bytes"] == q["budget"]["used_bytes"]
    assert q["bits_per_weight"] > bpw - 0.25  # the budget is used, not wasted
    assert sum(q["budget"]["formats"].values()) == sum(1 for t in q["tensors"].values() if "bits" in t)


def test_seed_budget_scales_bits_per_weight(tmp_path):
    src = tmp_path / "src"
    make_model(src)
    entry = {"seed": {"size_gb": 3}, "params_full": 7_615_616_512}
    q = quantize_model(src, {"name": "seed-size", "method": "mixed", "budget": "seed", "base": "rtn"}, tmp_path / "out", entry)
    assert q["budget"]["bpw"] == pytest.approx(3e9 * 8 / 7_615_616_512)
    assert q["bits_per_weight"] <= q["budget"]["bpw"]
    with pytest.raises(LlmoptError, match="params_full"):
        quantize_model(src, "seed-size", tmp_path / "out2", {"seed": {"size_gb": 3}, "params_full": 0})
    assert not (tmp_path / "out2").exists()


def test_sharded_output(tmp_path):
    src = tmp_path / "src"
    tensors = make_model(src, layers=20)
    out = tmp_path / "out"
    quantize_model(src, {"name": "w8", "method": "rtn", "bits": 8, "group": 0, "shard_bytes": 2**20}, out, {})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and set(index["weight_map"].values()) == set(shards)
    assert set(load_folder(out)) == set(tensors)


def test_none_method_casts(tmp_path):
    src = tmp_path / "src"
    make_model(src)
    q = quantize_model(src, {"name": "f32", "method": "none", "dtype": "float32"}, tmp_path / "out", {})
    assert q["bits_per_weight"] == pytest.approx(32.0)
    assert all(t.dtype == torch.float32 for t in load_folder(tmp_path / "out").values())


def test_bad_inputs_leave_no_output(tmp_path):
    src = tmp_path / "src"
    make_model(src)
    out = tmp_path / "out"
    cases = [
        ("w5", "unknown scheme"),
        ({"name": "x", "method": "awq", "bits": 4}, "method 'awq' is unknown"),
        ({"name": "x", "method": "rtn", "bits": 4, "colour": 1}, "unknown key"),
        ({"name": "x", "method": "rtn", "bits": 4, "group": 96}, "does not fit"),
        ({"name": "x", "method": "mixed", "budget": {"bpw": 2.0}}, "below the floor"),
        ({"name": "x", "method": "mixed", "budget": {"bpw": -1}}, "budget must be"),
        ({"name": "x", "method": "gptq", "bits": 4}, "synthetic"),
        ({"name": "x", "method": "rtn", "bits": 4, "calibration": {"texts": ["hamlet"]}}, "overlap"),
    ]
    for scheme, message in cases:
        with pytest.raises(LlmoptError, match=message):
            quantize_model(src, scheme, out, {})
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary folder left behind either


def test_indivisible_width(tmp_path):
    src = tmp_path / "src"
    make_model(src, extra={"model.odd.weight": torch.randn(8, 96).to(torch.bfloat16)})
    with pytest.raises(LlmoptError, match="model.odd.weight.*width 96"):
        quantize_model(src, "w4g128", tmp_path / "out", {})
    q = quantize_model(src, {"name": "w4g128", "method": "rtn", "bits": 4, "on_indivisible": "keep"}, tmp_path / "out", {})
    assert q["tensors"]["model.odd.weight"]["dtype"] == "bfloat16"


def test_corrupt_input(tmp_path):
    src = tmp_path / "src"
    make_model(src)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(LlmoptError, match="corrupt safetensors"):
        quantize_model(src, "w4g128", tmp_path / "out", {})
    assert not (tmp_path / "out").exists()
    (src / "model.safetensors").unlink()
    with pytest.raises(LlmoptError, match="no model.safetensors"):
        quantize_model(src, "w4g128", tmp_path / "out", {})


_MEMORY_PROBE = """
import resource, sys, torch
from pathlib import Path
from safetensors.torch import save_file
src = Path(sys.argv[1])
torch.manual_seed(0)
save_file({f"model.layers.{i}.mlp.weight": torch.randn(2048, 4096).to(torch.bfloat16) for i in range(12)}, str(src / "model.safetensors"))
(src / "config.json").write_text("{}")
from llmopt.quant.pipeline import quantize_model
import gc; gc.collect()
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
base = rss()
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
quantize_model(src, {"name": "w4", "method": "rtn", "bits": 4, "shard_bytes": 8 * 2**20}, src.parent / "out", {})
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(peak - base)
"""


def test_streaming_peak_memory_is_about_one_tensor(tmp_path):
    # 12 tensors of 16 MiB bf16 (192 MiB source, 48 MiB packed): peak growth must stay near one tensor's float32
    # working set (32 MiB + temporaries), far below the whole model.
    (tmp_path / "src").mkdir()
    got = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(tmp_path / "src")], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr[-2000:]
    growth = int(got.stdout.strip().splitlines()[-1])
    assert growth < 160 * 2**20, f"peak grew by {growth / 2**20:.0f} MiB"
