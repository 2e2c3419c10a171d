"""The AIE2 cost model: its FLOP counts equal the arithmetic in each kernel's MLIR (counted op by op over the
iteration spaces), its byte counts equal what the IREE CPU run of the kernel passes in and out, and its
predictions are marked predicted and behave like a roofline (memory-bound decode GEMV, scaling with bytes).
"""

from __future__ import annotations

import numpy as np
import pytest

from llmopt.backends.npu.compile import compile_module, self_test_specs
from llmopt.backends.npu.kernels import render
from llmopt.backends.npu.reference import case
from llmopt.backends.npu.runtime import IreeModule
from llmopt.costmodel import PHOENIX, describe, kernel_counts, predict_kernel
from llmopt.costmodel.counts import ir_flops
from llmopt.errors import LlmoptError

SPECS = self_test_specs()


def shape_of(spec, inputs):
    """Cost-model shape, template variant and the walker's loop sizes for one test case of ``spec``."""
    p, k = spec.values(), spec.kernel
    variant = {"bits": p.get("BITS", 4), "asym": p.get("ASYM", False), "bias": p.get("BIAS", False)}
    if k in ("qgemv", "qgemm"):
        m = inputs[0].shape[0]
        return {"M": m, "N": p["N"], "K": p["K"], "G": p["G"]}, variant, {"m": m}
    if k in ("attention", "sliding_window_attention"):
        b, _, t, _ = inputs[0].shape
        s = inputs[1].shape[2]
        shape = {"B": b, "T": t, "S": s, "HQ": p["HQ"], "HKV": p["HKV"], "D": p["D"]}
        return shape, {"softcap": p["CAPPED"]}, {"b": b, "t": t, "s": s, "softmax": [b, t, s]}
    if k == "rope_attention":
        b, t = inputs[0].shape[:2]
        past = inputs[4].shape[2]
        shape = {"B": b, "T": t, "P": past, "HQ": p["HQ"], "HKV": p["HKV"], "D": p["D"]}
        return shape, {}, {"b": b, "t": t, "p": past, "u": t, "s": past + t, "softmax": [b, t, past + t]}
    if k == "gated_ffn":
        m = inputs[0].shape[0]
        act = spec.p.get("ACT", "silu")
        return {"M": m, "H": p["H"], "F": p["F"], "G": spec.p["G"]}, {"bits": spec.p["BITS"], "act": act}, {"m": m}
    if k == "vl_patch_merger":
        t = inputs[0].shape[0]
        return {"T": t, "C": p["C"], "DOUT": p["DOUT"], "MERGE": p["MERGE"]}, {}, {"t": t, "m": t // p["MERGE"]}
    raise AssertionError(k)


@pytest.mark.parametrize("spec", SPECS, ids=[s.label for s in SPECS])
def test_flops_match_the_kernel_ir(spec):
    inputs, _, _ = case(spec, seed=1)
    shape, variant, sizes = shape_of(spec, inputs)
    counts = kernel_counts(spec.kernel, shape, **variant)
    assert counts["flops"] == ir_flops(render(spec), sizes), spec.label


@pytest.mark.parametrize("spec", SPECS, ids=[s.label for s in SPECS])
def test_bytes_match_the_iree_run(spec):
    inputs, expected, _ = case(spec, seed=2)
    outputs = IreeModule(compile_module(spec).path)(*inputs)
    moved = sum(np.asarray(a).nbytes for a in inputs) + sum(o.nbytes for o in outputs)
    shape, variant, _ = shape_of(spec, inputs)
    assert kernel_counts(spec.kernel, shape, **variant)["bytes"] == moved, spec.label


def test_decode_gemv_is_memory_bound_and_predicted():
    r = predict_kernel("qgemv", {"M": 1, "N": 3584, "K": 3584, "G": 128}, bits=4)
    assert r["predicted"] is True and r["bound"] == "memory"
    assert r["seconds"] == pytest.approx(PHOENIX.launch_s + r["bytes"] / (PHOENIX.dma_bytes_per_s * PHOENIX.dma_efficiency))
    big = predict_kernel("qgemv", {"M": 1, "N": 3584, "K": 18944, "G": 128}, bits=4)
    assert big["seconds"] > r["seconds"] and big["bytes"] > 5 * r["bytes"]


def test_prefill_gemm_becomes_compute_bound():
    r = predict_kernel("qgemm", {"M": 2048, "N": 4096, "K": 4096, "G": 128}, bits=4)
    assert r["bound"] == "compute" and r["flops"] > 2 * 2048 * 4096 * 4096


def test_tiny_kernel_is_launch_bound():
    assert predict_kernel("qgemv", {"M": 1, "N": 64, "K": 64, "G": 32})["bound"] == "launch"


def test_constants_follow_facts():
    d = describe()
    assert d["tiles"] == 16 and d["local_bytes"] == 64 * 1024 and d["memtile_bytes"] == 512 * 1024
    assert d["peak_bf16_flops"] == pytest.approx(2 * 16 * 128 * 1e9) and d["predicted"] is True


@pytest.mark.parametrize("op, shape, message", [
    ("conv", {}, "unknown op 'conv'"),
    ("qgemv", {"M": 1, "K": 64}, "needs shape key N"),
    ("attention", {"S": 8, "HQ": 4, "HKV": 2, "D": 4096}, "no key chunk fits"),
])
def test_bad_shapes_are_clear_errors(op, shape, message):
    with pytest.raises(LlmoptError, match=message):
        predict_kernel(op, shape)


def test_layer_prediction_sums_its_kernels_and_uses_the_window():
    from llmopt.engine.config import ModelArgs

    cfg = {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 2,
           "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000,
           "sliding_window": 4096, "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 256}
    a = ModelArgs.from_hf(cfg)
    from llmopt.costmodel import predict_layer

    local, glob = (predict_layer(a, context=32768, layer=i) for i in range(2))
    assert local["predicted"] and len(local["kernels"]) == 6  # q, k, v, o, attention, gated FFN
    assert local["seconds"] == pytest.approx(sum(k["seconds"] for k in local["kernels"]))
    windowed = [k for k in local["kernels"] if "attention" in k["op"]][0]
    assert windowed["shape"]["S"] == 4096 if windowed["op"] == "sliding_window_attention" else True
    assert glob["seconds"] != local["seconds"]  # one of the two layers is global, attending over 32768 keys
    prefill = predict_layer(a, context=512, tokens=512, layer=0)
    assert {k["op"] for k in prefill["kernels"]} >= {"qgemm"} and len(prefill["kernels"]) == 8


def test_roofline_reads_the_npu_ceilings():
    from llmopt.costmodel import npu_ceilings

    c = npu_ceilings()
    assert c["predicted"] and c["bandwidth"] == PHOENIX.dma_bytes_per_s and c["flops"] == PHOENIX.peak_bf16_flops
    assert 0 < c["bw_eff"] <= 1 and 0 < c["flops_eff"] <= 1 and c["op_overhead_s"] == PHOENIX.launch_s
