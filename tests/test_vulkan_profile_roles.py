"""Mat-vec timings split by weight role (lavapipe in CI): ``VulkanBackend`` times each mat-vec / mat-mul of a decoder
weight as "<shader> <role>" (``backend.weight_role``: q+k+v, o, gate+up, down, head), so the replayed step's
profile (``VulkanDecoder(profile=True).kernel_times()``, bench/vulkan_decode.py's ``replay_profile``) shows where the
mat-vec time goes instead of summing ~113 dispatches under one name.

Checks: the role of every decoder weight name (fused names, the vision tower's and others' None); whole tiny
Qwen2 and Gemma 2 models, weights fused (q+k+v, gate+up) or not (mixed bit widths: q, k, v, gate, up apart), every
mat-vec of the replayed step labelled once a layer (head once), none left under the bare shader name, the eager
path's prefill mat-muls and decode mat-vecs likewise; the bench's per-weight split from the same profile; labels
never change results (replayed = eager bit for bit with profiling on).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from llmopt.engine import load_model
from tiny_models import COMMON, FAMILIES, pack_folder, save_random

from vulkan_device import require_vulkan
vulkan = require_vulkan()
pytestmark = pytest.mark.vulkan

from llmopt.backends.vulkan.backend import weight_role  # noqa: E402
from llmopt.backends.vulkan.replay import VulkanDecoder  # noqa: E402

LAYERS = COMMON["num_hidden_layers"]
FUSED = {"q+k+v": LAYERS, "o": LAYERS, "gate+up": LAYERS, "down": LAYERS, "head": 1}
APART = {"q": LAYERS, "k": LAYERS, "v": LAYERS, "o": LAYERS, "gate": LAYERS, "up": LAYERS, "down": LAYERS, "head": 1}


@pytest.mark.parametrize("name, role", [
    ("layers.3.self_attn.q_proj.weight", "q"),
    ("layers.0.self_attn.o_proj.weight", "o"),
    ("layers.11.mlp.down_proj.weight", "down"),
    ("lm_head.weight", "head"),
    ("layers.0.self_attn.q_proj.weight+layers.0.self_attn.k_proj.weight+layers.0.self_attn.v_proj.weight", "q+k+v"),
    ("layers.2.mlp.gate_proj.weight+layers.2.mlp.up_proj.weight", "gate+up"),
    ("visual.blocks.0.mlp.gate_proj", None),  # the vision tower's FFN is not the decoder's
    ("merger.mlp.0", None),
    ("layers.0.self_attn.q_proj.weight+visual.blocks.0.attn.q", None),  # any part without a role: none
    ("embed_tokens.weight", None),
    ("o", None),  # a benchmark's weight named after a shape, not a role
    ("layers.0.self_attn.q_proj_extra.weight", None),  # whole name parts only
])
def test_weight_role(name, role):
    assert weight_role(name) == role


def matvec_labels(times: dict) -> dict:
    """role -> dispatches, for the mat-vec labels of ``kernel_times()``; fails on a mat-vec timed without a role."""
    bare = [k for k in times if k in ("matvec_quant", "matvec_quant_idot")]
    assert not bare, f"mat-vecs timed without their weight's role: {bare}"
    return {k.split(" ", 1)[1]: n for k, (_, n) in times.items() if k.startswith("matvec_quant")}


def tiny(tmp_path, family: str, fused: bool):
    """A tiny model with every 2-D weight packed: all int4 g32 (q/k/v and gate/up fuse), or int4 and int8 in turn
    (neighbours differ, so nothing fuses)."""
    from llmopt.quant.quantizers import Spec

    seed = int(torch.randint(0, 2**31 - 1, ()))
    folder = save_random(FAMILIES[family](), tmp_path / "f", seed)
    specs = [Spec(4, 32)] if fused else [Spec(4, 32), Spec(8, 0)]
    return pack_folder(folder, tmp_path / "q", specs), seed


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "apart"])
def test_replayed_profile_splits_matvecs_by_role(be, tmp_path, family, fused):
    folder, seed = tiny(tmp_path, family, fused)
    model = load_model(folder, backend=be)
    ids = torch.randint(0, COMMON["vocab_size"], (1, 6))
    model.static_decode = False
    logits, state = model.prefill(ids, max_len=8)
    token = logits.argmax(-1)
    dec = VulkanDecoder(model, state, profile=True)
    try:
        replay_state = dataclasses.replace(state, valid=state.valid.clone())
        replayed = dec.step(replay_state, token)
        eager = model.decode_step(state, token)
        assert torch.equal(replayed, eager), f"{family} seed={seed}: profiled replay differs from eager"
        counts = matvec_labels(dec.kernel_times())
    finally:
        dec.close()
    assert counts == (FUSED if fused else APART), f"{family} seed={seed}"


def test_eager_profile_labels_matmuls_and_matvecs(tmp_path):
    folder, _ = tiny(tmp_path, "qwen2", True)
    be = vulkan.VulkanBackend(profile=True)
    try:
        model = load_model(folder, backend=be)
        model.static_decode = False
        be.synchronize()
        be.dev.kernel_times.clear()
        be.dev.kernel_counts.clear()
        logits, state = model.prefill(torch.randint(0, COMMON["vocab_size"], (1, 12)), max_len=13)  # 12 rows: mat-muls
        times = be.kernel_times()
        prefill = {k.split(" ", 1)[1]: n for k, (_, n) in times.items() if k.startswith("matmul_quant")}
        assert prefill == {"q+k+v": LAYERS, "o": LAYERS, "gate+up": LAYERS, "down": LAYERS}  # the head: last row
        assert "matmul_quant" not in times
        be.dev.kernel_times.clear()
        be.dev.kernel_counts.clear()
        model.decode_step(state, logits.argmax(-1))
        assert matvec_labels(be.kernel_times()) == FUSED
    finally:
        be.close()


def bench_module():
    """``bench/vulkan_decode.py`` as a module (bench scripts are not a package)."""
    spec = importlib.util.spec_from_file_location("vulkan_decode", Path(__file__).parents[1] / "bench" / "vulkan_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_replay_profile_per_weight(be, tmp_path):
    bench = bench_module()
    folder, _ = tiny(tmp_path, "qwen2", True)
    model = load_model(folder, backend=be)
    model.static_decode = False
    logits, state = model.prefill(torch.randint(0, COMMON["vocab_size"], (1, 5)), max_len=8)
    profile = bench.replay_profile(be, model, state, logits.argmax(-1), 2)
    split = profile["matvec_by_weight"]
    assert {role: r["dispatches"] for role, r in split.items()} == FUSED
    assert all(r["ms"] > 0 for r in split.values())
    kernel = next(k for k in profile["kernels"] if k.startswith("matvec_quant"))
    assert sum(r["ms"] for r in split.values()) == pytest.approx(
        sum(r["ms"] for k, r in profile["kernels"].items() if k.split(" ")[0] == kernel.split(" ")[0]))
    assert state.start == 5  # the profile ran on a copy of the state


def test_bench_rejects_a_hidden_size_the_heads_do_not_divide(capsys):
    bench = bench_module()
    for argv, message in ((["--hidden", "256"], "qwen2.5-7b needs a multiple of 128 and of its 28 attention heads"),
                          (["--hidden", "260", "--models", "gemma-2-9b"], "gemma-2-9b needs a multiple of 128")):
        with pytest.raises(SystemExit):
            bench.main([*argv, "--no-sweep"])
        assert message in capsys.readouterr().err


def test_bench_same_context_variants(be):
    """--same-context: every variant decodes from the prompt on copies of the states (each checked against the eager
    path), so two runs of one variant see the same KV length; the per-token bytes count one variant's context, at the
    middle of its flight."""
    bench = bench_module()
    overrides = {"num_hidden_layers": 1, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256}
    prompt, steps, flight_steps = 6, 2, 4
    row = bench.decode_run(be, "gemma-2-9b", bench.MODELS["gemma-2-9b"], overrides, prompt, steps, flight_steps,
                           [{"name": "default"}, {"name": "chain", "decode_chain": "chain"}, {"name": "default"}],
                           same_context=True)
    assert row["same_context"] and [v["name"] for v in row["variants"]] == ["default", "chain", "default"]
    assert row["flight_steps"] == flight_steps and all(v["flight_steps"] == flight_steps for v in row["variants"])
    for v in row["variants"]:
        assert v["replay_vs_eager"] == {"max_abs_diff": 0.0, "same_token": True, "flight_same_tokens": True}, v["name"]
    from llmopt.engine.config import ModelArgs
    from llmopt.engine.weights import expected_shapes

    args = ModelArgs.from_hf(dict(bench.MODELS["gemma-2-9b"], **overrides), where="test")
    rng = np.random.default_rng(0)
    weights = sum(bench.random_int4(shape, rng).nbytes if len(shape) == 2 else 4 * int(np.prod(shape))
                  for shape in expected_shapes(args).values())  # Gemma ties the embedding: every tensor read
    kv = 2 * 1 * (prompt + steps + 3 + flight_steps // 2) * 8 * 256 * 4  # one layer, 8 KV heads of 256, float32 K, V
    assert row["bytes_per_token"] == weights + kv
