"""The Vulkan compile stage and runtime: incremental rebuilds, stale/missing SPIR-V, absent device, out of memory,
the no-subgroup variant, submissions in flight (waited for later), and a run under the Khronos validation layer
(synchronization validation on; greedy decoding with two replayed steps in flight, the fused decode attention split
over the context and a profiled replayed step included) that must print no message (``vulkan_device`` says where
the layer comes from).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from llmopt.errors import LlmoptError

from vulkan_device import CHAINED_SHADERS, require_vulkan, run_under_validation_layer
vulkan = require_vulkan()
from llmopt.backends.vulkan import compile as vk_compile  # noqa: E402

pytestmark = pytest.mark.vulkan
PROBE = vulkan.probe()

SHADERS = vk_compile.REPO_SHADERS


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    src = tmp_path_factory.mktemp("shaders")
    for f in SHADERS.iterdir():
        shutil.copy(f, src / f.name)
    out = tmp_path_factory.mktemp("spv")
    return src, out, vk_compile.compile_shaders(src, out, PROBE)


def test_one_spirv_per_shader_and_incremental_rebuild(compiled):
    src, out, manifest = compiled
    stems = sorted(p.stem for p in src.glob("*.comp"))
    stems = sorted(stems + [f"{s}_chain" for s in CHAINED_SHADERS])
    assert sorted(manifest["shaders"]) == stems and all((out / f"{s}.spv").stat().st_size > 0 for s in stems)
    again = vk_compile.compile_shaders(src, out, PROBE)
    assert not any(e["rebuilt"] for e in again["shaders"].values())
    (src / "add.comp").write_text((src / "add.comp").read_text() + "\n// edited\n")
    edited = vk_compile.compile_shaders(src, out, PROBE)
    assert [s for s, e in edited["shaders"].items() if e["rebuilt"]] == ["add"]
    (src / "act.glsl").write_text((src / "act.glsl").read_text() + "\n// header edited\n")
    header = vk_compile.compile_shaders(src, out, PROBE)  # act.glsl: by act.comp, gated_act.comp, matvec_quant.glsl
    assert sorted(s for s, e in header["shaders"].items() if e["rebuilt"]) == [  # and their chained builds
        "act", "gated_act", "gated_act_chain", "matvec_quant", "matvec_quant_chain", "matvec_quant_idot",
        "matvec_quant_idot_chain"]
    (src / "broken.glsl").write_text('#include "absent.glsl"\n')
    (src / "add.comp").write_text('#include "broken.glsl"\n' + (src / "add.comp").read_text())
    with pytest.raises(LlmoptError, match=r'broken\.glsl: includes "absent\.glsl", which is not in'):
        vk_compile.compile_shaders(src, out, PROBE)
    (src / "broken.glsl").unlink()
    (src / "add.comp").write_text((src / "add.comp").read_text().split("\n", 1)[1])
    assert vk_compile.check_manifest(out, src)["spec"] == vk_compile.device_config(PROBE)["spec"]


def test_stale_missing_or_corrupt_spirv_is_refused(compiled, tmp_path):
    src, out, _ = compiled
    shaders, spv = tmp_path / "shaders", tmp_path / "spv"
    shutil.copytree(src, shaders)
    shutil.copytree(out, spv)
    vk_compile.check_manifest(spv, shaders)
    (shaders / "rope.comp").write_text((shaders / "rope.comp").read_text() + "\n// changed\n")
    with pytest.raises(LlmoptError, match=r"rope\.spv: stale"):
        vk_compile.check_manifest(spv, shaders)
    shutil.copy(src / "rope.comp", shaders / "rope.comp")
    (spv / "argmax.spv").write_bytes((spv / "argmax.spv").read_bytes()[:-8])
    with pytest.raises(LlmoptError, match=r"argmax\.spv: contents differ"):
        vk_compile.check_manifest(spv, shaders)
    (spv / "argmax.spv").unlink()
    with pytest.raises(LlmoptError, match=r"argmax\.spv: SPIR-V for shader 'argmax' is missing"):
        vk_compile.check_manifest(spv, shaders)
    (spv / "manifest.json").unlink()
    with pytest.raises(LlmoptError, match="manifest.json: missing"):
        vulkan.VulkanBackend(kernel_dir=spv)


def test_compile_errors_name_the_cause(tmp_path):
    with pytest.raises(LlmoptError, match="vulkan target absent, nothing to compile: no GPU here"):
        vk_compile.compile_shaders(SHADERS, tmp_path, {"present": False, "reason": "no GPU here"})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.comp").write_text("#version 450\nvoid main() { undefined_call(); }\n")
    with pytest.raises(LlmoptError, match=r"broken\.comp: glslc failed"):
        vk_compile.compile_shaders(bad, tmp_path / "out", PROBE)
    assert not (tmp_path / "out" / "broken.spv").exists()  # nothing half-written
    with pytest.raises(LlmoptError, match="no .comp shaders found"):
        vk_compile.compile_shaders(tmp_path / "out", tmp_path / "o2", PROBE)


def test_no_vulkan_driver_is_reported_not_raised():
    code = ("import json; from llmopt.backends.vulkan import probe, VulkanBackend\n"
            "from llmopt.errors import LlmoptError\n"
            "p = probe()\n"
            "try:\n    VulkanBackend(); err = None\nexcept LlmoptError as e:\n    err = str(e)\n"
            "print(json.dumps({'probe': p, 'error': err}))\n")
    env = dict(os.environ, VK_ICD_FILENAMES="/nonexistent/icd.json", VK_DRIVER_FILES="/nonexistent/icd.json")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["probe"]["present"] is False and "no usable Vulkan driver" in out["probe"]["reason"]
    assert out["error"].startswith("vulkan backend unavailable: ")


def test_out_of_device_memory_names_the_allocation():
    be = vulkan.VulkanBackend()
    try:
        with pytest.raises(LlmoptError, match=r"out of device memory on .* allocating 4194304\.0 MiB for huge weight"):
            be.dev.buffer(1 << 42, name="huge weight")
    finally:
        be.close()


def test_kv_cache_beyond_storage_range_is_refused():
    be = vulkan.VulkanBackend()
    try:
        with pytest.raises(LlmoptError, match="exceeds the device's storage-buffer range"):
            be.kv_cache(1, 64, 1 << 20, 8, 128, [None])
    finally:
        be.close()


def test_widths_without_shaders_are_refused():
    """int5 / int6 (in the format for the CPU, CUDA and mixed precision) are refused by name, not misdecoded."""
    from llmopt.quant.quantizers import Spec, quantize

    be = vulkan.VulkanBackend()
    try:
        for bits in (5, 6):
            qt = quantize(torch.randn(8, 64), Spec(bits, 32, True), "rtn")
            with pytest.raises(LlmoptError, match=rf"layers\.0\.w: int{bits} weights have no Vulkan kernels yet"):
                be.linear_weight("layers.0.w", qt)
    finally:
        be.close()


def test_variant_without_subgroups(tmp_path):
    """Devices lacking subgroup arithmetic get shared-memory reductions; same results."""
    from llmopt.backends.base import AttnSpec
    from llmopt.backends.cpu import CpuBackend

    probe = json.loads(json.dumps(PROBE))
    probe["features"]["subgroup_arithmetic"] = False
    manifest = vk_compile.compile_shaders(SHADERS, tmp_path, probe)
    assert manifest["defines"]["USE_SUBGROUP"] == 0
    be, cpu = vulkan.VulkanBackend(kernel_dir=tmp_path), CpuBackend(quant="reference")
    try:
        gen = torch.Generator().manual_seed(int(torch.seed() % 2**31))
        x = torch.randn(2, 3, 48, generator=gen)
        w = torch.randn(48, generator=gen)
        assert torch.allclose(be.to_host(be.rmsnorm(be.from_host(x), be.param("w", w), 1e-6, True)),
                              cpu.rmsnorm(x, w, 1e-6, True), atol=1e-5)
        head = torch.randn(37, 48, generator=gen)
        xa = be.from_host(x)
        logits = be.logits(xa, be.linear_weight("h", head))
        assert torch.allclose(logits, x[:, -1] @ head.T, atol=1e-4)
        assert torch.equal(be.argmax(be.logits_device(xa, be.linear_weight("h", head))), logits.argmax(-1))
        spec = AttnSpec(4, 2, 12, 0.3, window=3, softcap=10.0)
        q, k, v = torch.randn(1, 5, 48, generator=gen), torch.randn(1, 5, 24, generator=gen), torch.randn(1, 5, 24, generator=gen)
        cv, cc = be.kv_cache(1, 1, 8, 2, 12, [3]), cpu.kv_cache(1, 1, 8, 2, 12, [3])
        out = be.to_host(be.attention(be.from_host(q), be.from_host(k), be.from_host(v), cv, 0, 0, None, spec))
        assert torch.allclose(out, cpu.attention(q, k, v, cc, 0, 0, None, spec), atol=1e-5)
    finally:
        be.close()


VALIDATED_RUN = r'''
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM
from llmopt.backends.base import AttnSpec
from llmopt.backends.vulkan import VulkanBackend
from llmopt.engine import load_model
from llmopt.quant.format import QuantizedTensor, pack_bits
import sys

folder = sys.argv[1]
cfg = Gemma2Config(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, sliding_window=5, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0, query_pre_attn_scalar=24)
torch.manual_seed(0)
Gemma2ForCausalLM(cfg).save_pretrained(folder)
be = VulkanBackend()
model = load_model(folder, backend=be)
for temperature in (0.0, 0.8):  # the replayed step: greedy tail (argmax on the device) and logits tail
    gen = model.generate([[5, 6, 7], [8, 9]], max_new_tokens=6, temperature=temperature, stop_ids=[])
    assert gen.timings["decode_path"] == "replayed", gen.timings["decode_path"]
    print("tokens", gen.tokens)
# greedy runs two replayed steps in flight; a stop met mid-run drops the step queued past it
greedy = model.generate([[5, 6, 7], [8, 9]], max_new_tokens=7, stop_ids=[])
stop = model.generate([[5, 6, 7], [8, 9]], max_new_tokens=7, stop_ids=[greedy.tokens[0][2]])
assert stop.finish[0] == "stop", (greedy.tokens, stop.tokens)
assert stop.tokens[0] == greedy.tokens[0][:len(stop.tokens[0])], (greedy.tokens, stop.tokens)
print("tokens", stop.tokens, stop.finish)
assert any(f is not None for _, f in be._fused.values())  # q/k/v and gate/up ran as fused dispatches
be.attn_chunk_min, be.attn_split_target = 2, 64  # fused decode attention over several chunks, combined on the device
print("tokens", model.generate([[5, 6, 7, 8, 9, 10, 11], [8, 9]], max_new_tokens=5, stop_ids=[]).tokens)
from llmopt.backends.vulkan.replay import VulkanDecoder
logits, state = model.prefill(torch.tensor([[5, 6, 7, 8, 9]]), max_len=9)
dec = VulkanDecoder(model, state, profile=True)  # timestamps and a query-pool reset inside the recording
dec.step(state, logits.argmax(-1), greedy=True)
dec.replay(2)
assert dec.kernel_times()["rope_attention"][1] == 3 * cfg.num_hidden_layers
dec.close()
for bits in (2, 3, 4, 8):  # every packed width, decode and prefill kernels
    codes = torch.randint(0, 2**bits, (24, 64), dtype=torch.int32).to(torch.uint8)
    qt = QuantizedTensor(pack_bits(codes, bits), torch.rand(24, 2).half(), torch.rand(24, 2).half(), bits, 32, (24, 64))
    w = be.linear_weight("q", qt, torch.randn(24))
    for m in (1, 12):
        be.to_host(be.linear(be.from_host(torch.randn(1, m, 64)), w))
    be.matvec_int_dot = True  # the packed-dot variant (shaderIntegerDotProduct enabled at device creation)
    be.to_host(be.linear(be.from_host(torch.randn(1, 1, 64)), w))
    be.matvec_int_dot = False
def int4(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32).to(torch.uint8)
    return QuantizedTensor(pack_bits(codes, 4), torch.rand(n, k // 32).half(), torch.rand(n, k // 32).half(), 4, 32, (n, k))
be.matvec_int_dot = be.matvec_x_q8 = be.fuse_gated_act = True  # a GPU's FFN: the gated mat-vec writes down's x8 rows
gate, up = (be.linear_weight(f"mlp.{n}_proj", int4(96, 64)) for n in ("gate", "up"))
h = be.gated_linears(be.from_host(torch.randn(1, 2, 64)), gate, up, "gelu_tanh")
assert h.q8 is not None
be.to_host(be.linear(h, be.linear_weight("mlp.down_proj", int4(64, 96))))
be.matvec_int_dot = be.matvec_x_q8 = be.fuse_gated_act = False
x = be.from_host(torch.randn(1, 10, 32))
y = be.layernorm(x, be.param("w", torch.randn(32)), be.param("b", torch.randn(32)), 1e-5)
y = be.attention_full(y, y, y, [(0, 4), (4, 10)], AttnSpec(2, 2, 16, 0.25))
be.to_host(be.act(y, "quick_gelu"))
be.to_host(be.embedding(torch.tensor([[1, 2]]), be.embedding_table("e", torch.randn(4, 8)), 2.0))
be.copy(x.buf, be._new(x.shape).buf, 4 * 320)
be.close()
print("done")
'''


def test_runs_clean_under_validation_layer(tmp_path):
    run_under_validation_layer(VALIDATED_RUN, str(tmp_path / "model"))



def test_profile_times_each_kernel():
    be = vulkan.VulkanBackend(profile=True)
    try:
        a = be.from_host(torch.arange(10.0).view(1, 1, 10))
        out = be.add(a, a)
        assert torch.equal(be.to_host(out).view(-1), 2 * torch.arange(10.0))
        assert be.kernel_times()["add"][1] == 1  # one timestamped dispatch
    finally:
        be.close()


def test_submissions_in_flight_read_what_the_one_before_wrote():
    """``submit(..., wait=False)``: recordings queued back to back, each reading the previous one's output, waited
    for later (in any order); a ticket is spent once waited for; the device closes with work still queued."""
    import numpy as np

    be = vulkan.VulkanBackend()
    dev = be.dev
    try:
        n = 1 << 12
        data = np.random.default_rng(0).standard_normal(n).astype(np.float32)
        src, out = dev.buffer(4 * n, host=True), dev.buffer(4 * n, host=True, cached=True)
        hops = [dev.buffer(4 * n) for _ in range(3)]
        src.view(np.float32)[:] = data
        recs = []
        for a, b in zip([src] + hops, hops + [out]):  # src -> hop0 -> hop1 -> hop2 -> out, one recording a hop
            dev.begin_recording()
            dev.copy(a, b, 4 * n)
            recs.append(dev.end_recording())
        tickets = [dev.submit((rec,), wait=False) for rec in recs]
        assert len({id(t.fence) for t in tickets}) == len(tickets)  # one fence per submission in flight
        for ticket in reversed(tickets):
            dev.wait(ticket)
        assert np.array_equal(out.view(np.float32), data)
        with pytest.raises(LlmoptError, match="already waited for"):
            dev.wait(tickets[0])
        out.view(np.float32)[:] = 0
        tickets = [dev.submit((rec,), wait=False) for rec in recs]  # the spent fences are reused
        assert len(dev._all_tickets) == len(recs)
        dev.wait(tickets[-1])  # the last one's fence: every earlier submission has run too
        assert np.array_equal(out.view(np.float32), data)
        for ticket in tickets[:-1]:  # every ticket is waited for once (its fence goes back to the idle ones)
            dev.wait(ticket)
        assert len(dev._idle_tickets) == len(recs)
        dev.submit((recs[0],), wait=False)  # left queued: close waits for the device
    finally:
        be.close()
