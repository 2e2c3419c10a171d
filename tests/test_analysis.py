"""llmopt.analysis: parameter counts, bytes, FLOPs and KV cache of every registry model, checked against published
parameter counts (exact), transformers' own models (exact, tiny shapes) and hand-derived formulas."""

from __future__ import annotations

import json

import pytest
import torch

from llmopt.analysis import Arch, Precision, analyze, entry_config, measured_unit_bytes
from llmopt.errors import LlmoptError

# Parameter counts published on the model cards / safetensors indexes of the real checkpoints (vision included).
PUBLISHED = {"qwen2.5-7b-instruct": 7_615_616_512, "qwen2.5-14b-instruct": 14_770_033_664,
             "qwen2.5-32b-instruct": 32_763_876_352, "qwq-32b-preview": 32_763_876_352,
             "gemma-2-9b-it": 9_241_705_984, "gemma-2-2b-it": 2_614_341_888, "gemma-3-27b-it": 27_432_406_640,
             "qwen2.5-vl-7b-instruct": 8_292_166_656, "gemma-3-270m": 268_098_176}


@pytest.fixture(scope="module")
def registry_models():
    from llmopt.registry import load

    return load().all_models


def test_full_scale_parameter_counts_match_published(registry_models):
    assert set(PUBLISHED) <= set(registry_models)
    for model_id, count in PUBLISHED.items():
        an = analyze(Arch.from_entry(registry_models[model_id], model_id))
        assert an.params == count, model_id


@pytest.mark.parametrize("family,kw", [
    ("qwen2", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)),
    ("gemma2", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, vocab_size=300)),
    ("gemma3_text", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=32, vocab_size=300)),
])
def test_params_and_bytes_equal_transformers_model(family, kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    hf_params = sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once
    an = analyze(Arch.from_hf(cfg.to_dict()), Precision(linear_bpw=16, embed_bpw=16, float_bytes=2))
    assert an.params == hf_params
    assert an.weight_bytes == 2 * hf_params  # everything bf16
    linear = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
    assert sum(op.flops_per_token for op in an.ops if op.kind == "linear" and op.unit == "layer") == 2 * linear


def test_precision_from_scheme():
    assert Precision.from_scheme({"name": "w4g128", "method": "rtn", "bits": 4, "group": 128}).linear_bpw == 4.125
    asym = Precision.from_scheme({"name": "a", "method": "rtn", "bits": 4, "group": 128, "sym": False})
    assert asym.linear_bpw == 4.25
    assert Precision.from_scheme({"name": "bf16", "method": "none"}).linear_bpw == 16.0
    with pytest.raises(LlmoptError, match="needs 'bits'"):
        Precision.from_scheme({"name": "x", "method": "rtn"})


def test_decode_bytes_and_kv_cache_follow_windows(registry_models):
    e = registry_models["gemma-2-9b-it"]
    arch = Arch.from_entry(e, "gemma-2-9b-it")
    an, a = analyze(arch, Precision(linear_bpw=4.125, kv_bytes=2)), arch.args
    kv_per_tok = 2 * a.n_kv_heads * a.head_dim * 2  # K and V, fp16
    assert an.kv_bytes_per_token() == a.n_layers * kv_per_tok
    # Gemma 2 alternates 4096-token sliding layers with global ones: past the window only globals keep growing.
    n_global = sum(w is None for w in a.windows)
    assert n_global == a.n_layers // 2
    grow = an.kv_cache_bytes(8192) - an.kv_cache_bytes(4096)
    assert grow == n_global * kv_per_tok * 4096
    # Batch-1 decode reads every linear weight once, the head once, one embedding row, and the cache.
    flops, moved = an.totals("decode", 100)
    linear_bytes = sum(op.weight_bytes for op in an.ops if op.kind == "linear")
    assert linear_bytes < moved < linear_bytes * 1.02
    assert flops == pytest.approx(2 * sum(op.params for op in an.ops if op.kind == "linear"), rel=0.01)


def test_prefill_counts_causal_attention_exactly():
    arch = Arch.from_hf({"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300})
    attn = next(op for op in analyze(arch).ops if op.kind == "attention")
    flops, _ = attn.prefill(10)
    # QK^T and PV: 2 FLOPs x 2 matmuls x heads x head_dim per attended pair; causal: 1 + 2 + ... + 10 = 55 pairs
    assert flops == attn.flops_per_token * 10 + 4 * 4 * 16 * 55


def test_vision_towers_are_counted(registry_models):
    vl = analyze(Arch.from_entry(registry_models["qwen2.5-vl-7b-instruct"], "vl"))
    assert vl.arch.vision["params"] == 676_550_144  # Qwen2.5-VL-7B 'visual.*' tensors
    assert vl.arch.vision["tokens_per_image"] == 256
    g3 = analyze(Arch.from_entry(registry_models["gemma-3-27b-it"], "g3"))
    assert g3.arch.vision["tokens_per_image"] == 256 and g3.arch.vision["flops_per_image"] > 1e12


def test_measured_unit_bytes_sum_to_the_file(tmp_path):
    from test_bench_models import build_tiny

    _, quant = build_tiny(tmp_path)
    sizes = measured_unit_bytes(quant)
    header_len = int.from_bytes((quant / "model.safetensors").read_bytes()[:8], "little")
    data = (quant / "model.safetensors").stat().st_size - 8 - header_len
    assert sum(v for k, v in sizes.items() if k != "tied") == data
    assert sorted(k for k in sizes if isinstance(k, int)) == [0, 1, 2]
    assert sizes["tied"] is False and sizes["embed"] == 384 * 128 * 4  # float32 embedding


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(LlmoptError, match="model_type"):
        Arch.from_hf({"model_type": "llama", "hidden_size": 8})
    with pytest.raises(LlmoptError, match="needs 'family'"):
        entry_config({"family": "mamba", "architecture": {}}, "m")
    with pytest.raises(LlmoptError, match="models.yaml: m: missing field 'hidden_size'"):
        Arch.from_entry({"family": "qwen2", "architecture": {"num_attention_heads": 4}}, "m")
    with pytest.raises(LlmoptError, match="config.json: file not found"):
        Arch.from_folder(tmp_path)
    with pytest.raises(LlmoptError, match="no \\*.safetensors"):
        measured_unit_bytes(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(LlmoptError, match="bad header"):
        measured_unit_bytes(tmp_path)


def test_analyze_command_writes_tables(tmp_path, capsys):
    import csv

    from llmopt.cli import main

    assert main(["analyze", "--models", "gemma-2-2b-it", "--bpw", "16", "4.125", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "analysis.json").read_text())["gemma-2-2b-it"]
    assert summary["bf16"]["params"] == PUBLISHED["gemma-2-2b-it"]
    assert summary["4.125bpw"]["weight_bytes"] < summary["bf16"]["weight_bytes"] / 2
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    profiles = {r["profile"] for r in rows}
    assert {"phoenix-ddr5", "phoenix-lpddr5x", "h100", "h200"} <= profiles
    assert all(r["seed_tok_s_low"] == "400" for r in rows)
    ops = list(csv.DictReader((tmp_path / "ops" / "gemma-2-2b-it.csv").open()))
    assert sum(int(r["params"]) for r in ops if r["unit"] == "layer") == 26 * (
        2304 * 256 * (8 + 4 + 4 + 8) + 3 * 2304 * 9216 + 4 * 2304)
    assert "gemma-2-2b-it" in capsys.readouterr().out
    assert main(["analyze", "--models", "gemma-2-2b-it", "--bpw", "0", "--out", str(tmp_path)]) == 2


def test_calibration_measures_present_targets_and_records_absent_ones():
    from llmopt import roofline

    cal = roofline.calibrate(["cpu", "npu"], repeats=1, size=256, prefill_tokens=4, host_mib=8)
    host, cpu = cal["host"], cal["backends"]["cpu"]
    assert host["bandwidth"] > 1e8 and host["matmul_float32"] > 1e8
    assert cpu["int4_gemv_bytes_s"] > 0 and cpu["gemm_flops_s"] > 0 and cpu["op_overhead_s"] > 0
    assert cal["backends"]["npu"]["error"].startswith("absent:")
    profile = roofline.calibrated_profile(cal)
    assert set(profile.devices) == {"cpu"}
    dev = profile.devices["cpu"]
    assert dev.bw_eff == pytest.approx(min(1.0, cpu["int4_gemv_bytes_s"] / host["bandwidth"]))
    assert dev.source.startswith("measured")
    with pytest.raises(LlmoptError, match="no backend was calibrated"):
        roofline.calibrated_profile({"host": host, "backends": {"npu": {"error": "absent"}}})


def test_profiles_round_trip_and_gpu_vulkan_uses_gpu_ceilings():
    from llmopt import roofline

    prof = roofline.stated_profiles()["phoenix-ddr5"]
    again = roofline.Profile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert again.devices["vulkan"].bandwidth == 89.6e9 and again.link("cpu", "npu").latency_s == 60e-6
    cal = {"host": {"bandwidth": 50e9, "matmul_float32": 1e12},
           "cuda": {"bandwidth": 3e12, "matmul_bfloat16": 700e12},
           "labels": {"vulkan": "NVIDIA H100 80GB HBM3", "cuda": "NVIDIA H100 80GB HBM3"},
           "backends": {t: {"int4_gemv_bytes_s": 1.5e12, "gemm_flops_s": 100e12, "op_overhead_s": 5e-6,
                            "link_latency_s": 1e-5, "link_bandwidth": 2e10} for t in ("cuda", "vulkan")}}
    devs = roofline.calibrated_profile(cal).devices
    assert devs["vulkan"].bandwidth == devs["cuda"].bandwidth == 3e12 and devs["vulkan"].bw_eff == 0.5
