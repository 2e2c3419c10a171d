"""Mat-vec epilogues (``shaders/matvec_quant.glsl``'s EPILOGUE, per-chunk completion counters) on lavapipe, forced
on: the gated gate/up mat-vec writing the x8 rows ``gated_act`` would write, and ``linear_add_rmsnorm`` (the o or
down projection, the residual add and the next RMSNorm in one mat-vec; the norm only as x8 rows and the sums of
squares of its chunks, from which the mat-vecs reading it make 1 / rms).

Tolerances (float64 references on fresh random inputs, odd sizes: outputs not a multiple of a workgroup's rows,
chunks straddling workgroups, batch > 1, biases, zero points, int2/3/4/8 and float weights):
* the gated epilogue's x8 rows and outputs: identical to the separate ``gated_act``'s (one quantizer);
* the residual stream of ``linear_add_rmsnorm``: identical to ``linear`` then ``add_rmsnorm`` (the same add);
  its x8 codes against a torch quantization of y * (w + offset): within 1 code, at most 1% off by one; its
  chunk sums of squares within 1e-6 relative; the mat-vecs reading it against ``int8_chunks`` of those values
  times 1 / rms: relative error below ``RTOL`` = 2e-5;
* whole tiny models, epilogues on against off: logits within 2e-2 relative (the norm's x8 scales round
  differently), eager and replayed with the epilogues on identical bit for bit, greedy tokens with two replayed
  steps in flight equal to one at a time, the completion counters all zero afterwards.
"""

from __future__ import annotations

import pytest
import torch

from llmopt.engine import load_model
from llmopt.errors import LlmoptError
from llmopt.quant.quantizers import Spec

vulkan = pytest.importorskip("llmopt.backends.vulkan")
from llmopt.backends.vulkan.backend import COUNTER_WORDS, MATVEC_MAX_M, int8_chunks  # noqa: E402
from test_vulkan_ops import random_qt, rel_err  # noqa: E402
from test_vulkan_x8_gated import ACTS, read_x8, x8_reference  # noqa: E402
from tiny_models import COMMON, FAMILIES, pack_folder, save_random  # noqa: E402

pytestmark = pytest.mark.vulkan
PROBE = vulkan.probe()
if not PROBE["present"]:
    pytest.skip(f"no Vulkan device: {PROBE['reason']}", allow_module_level=True)
if not PROBE["features"].get("integer_dot_product"):
    pytest.skip("the Vulkan device lacks shaderIntegerDotProduct", allow_module_level=True)

RTOL = 2e-5
# (wg, rows a set, invocations a set, min groups): outputs a workgroup 8, 3 (chunks straddle workgroups), 8 (two
# sets), fewer (rows halved for more workgroups), 6, 128 (32 sets: several chunks a workgroup, the last one partial)
CONFIGS = [(16, 8, 0, 1), (16, 3, 0, 1), (32, 4, 16, 1), (16, 8, 0, 64), (32, 6, 0, 1), (64, 4, 2, 1)]


@pytest.fixture
def fast(be, monkeypatch):
    """The GPU configuration: int-dot mat-vecs, x8 rows, both epilogues."""
    for key in ("matvec_int_dot", "matvec_x_q8", "fuse_gated_act", "fuse_matvec_norm"):
        monkeypatch.setattr(be, key, True)
    return be


def configure(be, monkeypatch, config):
    for key, value in zip(("wg", "rows_per_wg", "matvec_split", "matvec_min_groups"), config):
        monkeypatch.setattr(be, key, value)


def counters_zero(be) -> bool:
    return not be.dev.download(be.counters, 4 * COUNTER_WORDS, dtype="uint32").any()


# gated sets hold an even number of rows: 3 becomes 4, and 10 halved for more workgroups 4 (not 5)
@pytest.mark.parametrize("config", CONFIGS[1:4] + [(16, 10, 0, 64), CONFIGS[5]])
def test_gated_epilogue_writes_gated_acts_x8_rows(fast, gen, monkeypatch, config):
    be = fast
    configure(be, monkeypatch, config)
    for f, k, m, kind, biases in [(96, 128, 1, "silu", (True, False)), (160, 96, 3, "gelu_tanh", (False, True)),
                                  (224, 64, MATVEC_MAX_M, "gelu", (True, True))]:
        qts = [random_qt(f, k, 4, 32, False, torch.float16, gen) for _ in range(2)]
        bs = [torch.randn(f, generator=gen) if b else None for b in biases]
        gate, up = (be.linear_weight(n, q, b) for n, q, b in zip(("g", "u"), qts, bs))
        x = be.from_host(torch.randn(1, m, k, generator=gen))
        out = be.gated_linears(x, gate, up, kind)
        case = (config, f, k, m, kind)
        assert out.q8 is not None, case
        monkeypatch.setattr(be, "fuse_gated_act", False)
        monkeypatch.setattr(be, "wg", 32)  # gated_act writes x8 rows (32 values a workgroup)
        separate = be.gated_linears(x, gate, up, kind)
        configure(be, monkeypatch, config)
        monkeypatch.setattr(be, "fuse_gated_act", True)
        assert separate.q8 is not None
        assert torch.equal(be.to_host(out), be.to_host(separate)), case
        for got, want in zip(read_x8(be, out), read_x8(be, separate)):
            assert torch.equal(got, want), case
        dense = [q.dequantize(torch.float64) for q in qts]
        xr = int8_chunks(be.to_host(x))
        ref = ACTS[kind](xr @ dense[0].T + (bs[0].double() if biases[0] else 0)) * \
            (xr @ dense[1].T + (bs[1].double() if biases[1] else 0))
        assert rel_err(be.to_host(out), ref) < RTOL, case
    assert counters_zero(be)


def norm_reference(total: torch.Tensor, w: torch.Tensor, eps: float, offset: float):
    """Values the x8 rows hold (y * (w + offset)) and 1 / rms of each row, from the float32 residual stream."""
    t = total.reshape(-1, total.shape[-1])
    inv = torch.rsqrt(t.double().pow(2).mean(-1) + eps)
    return t * (w + offset), inv


@pytest.mark.parametrize("bits,config", [(4, c) for c in CONFIGS] + list(zip((2, 3, 8, 32), CONFIGS[1:])))
def test_linear_add_rmsnorm(fast, gen, monkeypatch, bits, config):
    be = fast
    configure(be, monkeypatch, config)
    for n, k, m, bias, sym, unit in [(96, 64, 1, False, True, False), (160, 128, 3, True, False, True),
                                     (288, 96, MATVEC_MAX_M, True, True, False)]:
        if bits == 32:
            w_o = torch.randn(n, k, generator=gen) * 0.1
            dense = w_o.double()
        else:
            w_o = random_qt(n, k, bits, 32, sym, torch.bfloat16, gen)
            dense = w_o.dequantize(torch.float64)
        b = torch.randn(n, generator=gen) if bias else None
        wo = be.linear_weight("o", w_o, b)
        readers = [random_qt(r, n, 4, 32, False, torch.float16, gen) for r in (40, 72)]
        r0, r1 = (be.linear_weight(f"r{i}", q, torch.randn(q.shape[0], generator=gen) if i else None)
                  for i, q in enumerate(readers))
        nw_host = torch.randn(n, generator=gen)
        nw = be.param("norm", nw_host)
        x, res = be.from_host(torch.randn(1, m, k, generator=gen)), be.from_host(torch.randn(1, m, n, generator=gen))
        eps, offset = 1e-6, 1.0 if unit else 0.0
        total, normed = be.linear_add_rmsnorm(x, wo, res, nw, eps, unit, (r0, r1))
        case = (config, bits, n, k, m)
        assert normed.buf is None and normed.q8 is not None and normed.rms is not None, case
        # the residual stream: the bits of linear then add_rmsnorm
        want_total, want_normed = be.add_rmsnorm(res, be.linear(x, wo), nw, eps, unit)
        host_total = be.to_host(total)
        assert torch.equal(host_total, be.to_host(want_total)), case
        ref_total = be.to_host(res).double() + be.to_host(x).double() @ dense.T + (b.double() if bias else 0)
        if bits != 32:  # float weights: the float-x mat-vec; quantized: int8 x (int-dot) or exact (3 bits)
            xr = be.to_host(x).double() if bits == 3 else int8_chunks(be.to_host(x))
            ref_total = be.to_host(res).double() + xr @ dense.T + (b.double() if bias else 0)
        assert rel_err(host_total, ref_total) < RTOL, case
        # x8 codes of y * (w + offset), and each chunk's sum of squares
        vals, inv = norm_reference(host_total, nw_host, eps, offset)
        codes, scales, sums = read_x8(be, normed)
        want_codes, want_scales = x8_reference(vals)
        diff = (codes - want_codes).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01, case
        assert rel_err(scales, want_scales) < 1e-6 and torch.equal(sums, codes.sum(-1).to(torch.int32)), case
        sums_sq = torch.from_numpy(be.dev.download(normed.rms, 4 * m * (n // 32))).view(m, -1)
        assert rel_err(sums_sq, host_total.reshape(m, -1, 32).double().pow(2).sum(-1)) < 1e-6, case
        # readers: q/k/v-like (linears, fused where they can be), one alone with a bias
        xq = int8_chunks(vals) * inv[:, None]
        for outs, qs, bs in [(be.linears(normed, (r0, r1)), readers, (None, r1.bias)),
                             ((be.linear(normed, r1),), readers[1:], (r1.bias,))]:
            for out, q, bb in zip(outs, qs, bs):
                ref = xq @ q.dequantize(torch.float64).T
                if bb is not None:
                    ref = ref + torch.from_numpy(be.dev.download(bb, 4 * q.shape[0])).double()
                assert rel_err(be.to_host(out).reshape(m, -1), ref) < RTOL, case
        # against the unfused norm: close (its x8 scales round differently)
        plain = be.to_host(be.linear(want_normed, r0))
        assert rel_err(be.to_host(be.linear(normed, r0)), plain) < 2e-2, case
    assert counters_zero(be)


def test_norm_feeds_the_gated_matvec_and_the_head(fast, gen):
    be = fast
    n, k, f, m = 128, 96, 160, 6
    wo = be.linear_weight("o", random_qt(n, k, 4, 32, True, torch.float16, gen))
    gq, uq = (random_qt(f, n, 4, 32, False, torch.float16, gen) for _ in range(2))
    gate, up = be.linear_weight("g", gq), be.linear_weight("u", uq)
    head_q = random_qt(75, n, 4, 64, True, torch.bfloat16, gen)
    head = be.linear_weight("head", head_q)
    nw_host = torch.randn(n, generator=gen)
    x, res = be.from_host(torch.randn(2, 3, k, generator=gen)), be.from_host(torch.randn(2, 3, n, generator=gen))
    total, normed = be.linear_add_rmsnorm(x, wo, res, be.param("nw", nw_host), 1e-6, True, (gate, up, head))
    assert normed.rms is not None
    vals, inv = norm_reference(be.to_host(total), nw_host, 1e-6, 1.0)
    xq = int8_chunks(vals) * inv[:, None]
    out = be.to_host(be.gated_linears(normed, gate, up, "silu")).reshape(m, f)
    ref = torch.nn.functional.silu(xq @ gq.dequantize(torch.float64).T) * (xq @ uq.dequantize(torch.float64).T)
    assert rel_err(out, ref) < RTOL
    logits = be.to_host(be.logits_device(normed, head, softcap=5.0))  # the last row of each sequence
    ref = 5.0 * torch.tanh(xq.view(2, 3, n)[:, -1] @ head_q.dequantize(torch.float64).T / 5.0)
    assert rel_err(logits, ref) < RTOL


def test_norm_feeds_every_piece_of_a_split_reader(fast, gen, monkeypatch):
    be = fast
    n = 256
    max_range = be.dev.max_range
    monkeypatch.setattr(be.dev, "max_range", 1024)  # 128 B a row: the reader in pieces of 8 rows
    reader_q = random_qt(70, n, 4, 32, True, torch.bfloat16, gen)
    reader = be.linear_weight("big", reader_q)
    monkeypatch.setattr(be.dev, "max_range", max_range)
    assert len(reader.pieces) == 9
    wo = be.linear_weight("o", random_qt(n, 64, 8, 32, False, torch.float16, gen))
    nw_host = torch.randn(n, generator=gen)
    x, res = be.from_host(torch.randn(1, 2, 64, generator=gen)), be.from_host(torch.randn(1, 2, n, generator=gen))
    total, normed = be.linear_add_rmsnorm(x, wo, res, be.param("nw", nw_host), 1e-5, True, (reader,))
    assert normed.rms is not None
    vals, inv = norm_reference(be.to_host(total), nw_host, 1e-5, 1.0)
    ref = (int8_chunks(vals) * inv[:, None]) @ reader_q.dequantize(torch.float64).T
    assert rel_err(be.to_host(be.linear(normed, reader)).reshape(2, -1), ref) < RTOL


def test_linear_add_rmsnorm_falls_back_and_refuses(fast, gen, monkeypatch):
    be = fast
    n, k = 64, 64
    wo = be.linear_weight("o", random_qt(n, k, 4, 32, True, torch.float16, gen))
    r4 = be.linear_weight("r4", random_qt(32, n, 4, 32, True, torch.float16, gen))
    r8 = be.linear_weight("r8", random_qt(32, n, 8, 32, True, torch.float16, gen))
    nw = be.param("nw", torch.randn(n, generator=gen))
    x, res = be.from_host(torch.randn(1, 2, k, generator=gen)), be.from_host(torch.randn(1, 2, n, generator=gen))
    # an int8 reader, a reader of other features, no readers, prefill rows: the float norm (linear, add_rmsnorm)
    r96 = be.linear_weight("r96", random_qt(32, 96, 4, 32, True, torch.float16, gen))
    for readers in [(r4, r8), (r4, r96), ()]:
        assert be.linear_add_rmsnorm(x, wo, res, nw, 1e-6, False, readers)[1].buf is not None
    long = be.from_host(torch.randn(1, MATVEC_MAX_M + 1, k, generator=gen))
    long_res = be.from_host(torch.randn(1, MATVEC_MAX_M + 1, n, generator=gen))
    assert be.linear_add_rmsnorm(long, wo, long_res, nw, 1e-6, False, (r4,))[1].buf is not None
    odd = be.linear_weight("odd", random_qt(40, k, 4, 32, True, torch.float16, gen))  # 40 outputs: no whole chunks
    r40 = be.linear_weight("r40", torch.randn(8, 40, generator=gen))
    out = be.linear_add_rmsnorm(x, odd, be.from_host(torch.randn(1, 2, 40, generator=gen)),
                                be.param("n40", torch.ones(40)), 1e-6, False, (r40,))
    assert out[1].buf is not None
    monkeypatch.setattr(be, "fuse_matvec_norm", False)
    assert be.linear_add_rmsnorm(x, wo, res, nw, 1e-6, False, (r4,))[1].buf is not None
    monkeypatch.setattr(be, "fuse_matvec_norm", True)
    # an x8-only norm where float values are wanted: a clear error, never garbage
    normed = be.linear_add_rmsnorm(x, wo, res, nw, 1e-6, False, (r4,))[1]
    assert normed.buf is None
    with pytest.raises(LlmoptError, match="exists only as x8 rows"):
        be.to_host(normed)
    with pytest.raises(LlmoptError, match="rmsnorm: an input exists only as x8 rows"):
        be.rmsnorm(normed, nw, 1e-6, False)
    with pytest.raises(LlmoptError, match="linear r8: its input was normed in a mat-vec epilogue"):
        be.linear(normed, r8)
    with pytest.raises(LlmoptError, match="linear o: input has 48 features, weight expects 64"):
        be.linear_add_rmsnorm(be.from_host(torch.randn(1, 2, 48, generator=gen)), wo, res, nw, 1e-6, False, (r4,))
    with pytest.raises(LlmoptError, match=r"residual \[1, 3, 64\] and input \[1, 2, 64\] differ in rows"):
        be.linear_add_rmsnorm(x, wo, be.from_host(torch.randn(1, 3, n, generator=gen)), nw, 1e-6, False, (r4,))
    with pytest.raises(LlmoptError, match="linear_add_rmsnorm: the norm weight holds 32 values, 64 features"):
        be.linear_add_rmsnorm(x, wo, res, be.param("short", torch.ones(32)), 1e-6, False, (r4,))
    assert counters_zero(be)


def tiny(family: str, tmp_path, seed: int):
    odd = {"hidden_size": 96, "num_attention_heads": 6, "intermediate_size": 160}  # 3 and 5 chunks of 32
    return pack_folder(save_random(FAMILIES[family](**odd), tmp_path / "f", seed), tmp_path / "q",
                       [Spec(4, 32, sym=False)])


@pytest.mark.parametrize("family", ["qwen2", "qwen2-sliding", "gemma2"])
def test_tiny_model_epilogues(be, tmp_path, monkeypatch, family):
    """Epilogues on against off (eager), on eager against on replayed (bit for bit), fewer dispatches a step,
    greedy tokens with two replayed steps in flight, counters zero after."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    model = load_model(tiny(family, tmp_path, seed), backend=be)
    name = f"{family} seed={seed}"
    ids = torch.randint(0, COMMON["vocab_size"], (2, 11))
    for key in ("matvec_int_dot", "matvec_x_q8"):
        monkeypatch.setattr(be, key, True)
    monkeypatch.setattr(be, "wg", 32)  # gated_act (epilogues off) writes x8 rows too
    runs, bodies = {}, {}
    for on in (False, True):
        monkeypatch.setattr(be, "fuse_gated_act", on)
        monkeypatch.setattr(be, "fuse_matvec_norm", on)
        for replay in (False, True):
            model.static_decode = replay
            logits, state = model.prefill(ids[:, :3], max_len=ids.shape[1] + 1)
            steps = [model.decode_step(state, ids[:, t]) for t in range(3, ids.shape[1])]
            runs[on, replay] = torch.stack([logits, *steps])
            if replay:
                bodies[on] = state.replay.body.n_commands
    assert torch.equal(runs[True, False], runs[True, True]), f"{name}: replayed differs from eager, epilogues on"
    assert torch.equal(runs[False, False], runs[False, True]), f"{name}: replayed differs from eager, epilogues off"
    assert rel_err(runs[True, True], runs[False, True]) < 2e-2, name
    layers = model.args.n_layers
    fewer = layers * (1 if family == "gemma2" else 3)  # gated_act; Qwen: both add_rmsnorm dispatches too
    assert bodies[False] - bodies[True] == fewer, (name, bodies)
    # greedy: two replayed steps in flight give the tokens of one step at a time (counters reset between steps)
    prompts = [torch.randint(0, COMMON["vocab_size"], (n,)).tolist() for n in (2, 6)]
    outs = []
    for replay in (False, True):
        model.static_decode = replay
        outs.append(model.generate(prompts, max_new_tokens=8, stop_ids=[]).tokens)
    assert outs[0] == outs[1], name
    assert counters_zero(be), name


def test_device_config_leaves_both_epilogues_off():
    """Measured slower on an H200 (docs/benchmarks.md, v9): built and tested, off unless asked for."""
    from llmopt.backends.vulkan import compile as vk_compile

    gpu = {"device": {"type": "discrete_gpu", "subgroup_size": 32, "max_workgroup_invocations": 1024},
           "features": {"subgroup_arithmetic": True, "integer_dot_4x8_signed_accelerated": True}}
    spec = vk_compile.device_config(gpu)["spec"]
    assert (spec["matvec_gated"], spec["matvec_norm"], spec["matvec_x_q8"]) == (0, 0, 1)


EPILOGUE_RUN = r'''
import sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[2])
from tiny_models import FAMILIES, pack_folder, save_random
from llmopt.backends.vulkan import VulkanBackend
from llmopt.engine import load_model
from llmopt.quant.quantizers import Spec

tmp = Path(sys.argv[1])
folder = pack_folder(save_random(FAMILIES["qwen2"](num_hidden_layers=2), tmp / "f", 0), tmp / "q", [Spec(4, 32)])
be = VulkanBackend()
be.matvec_int_dot = be.matvec_x_q8 = be.fuse_gated_act = be.fuse_matvec_norm = True
model = load_model(folder, backend=be)
gen = model.generate([[5, 6, 7], [8, 9]], max_new_tokens=6, stop_ids=[])  # two replayed steps in flight
assert gen.timings["decode_path"] == "replayed", gen.timings["decode_path"]
model.static_decode = False
assert model.generate([[5, 6, 7], [8, 9]], max_new_tokens=6, stop_ids=[]).tokens == gen.tokens
epilogues = {spec[9] for name, spec in be.dev.pipelines if name.startswith("matvec")}  # (wg, ..., EPILOGUE, X_RMS)
assert epilogues == {0, 1, 2}, epilogues
be.close()
print("done")
'''


def test_epilogues_run_clean_under_validation_layer(tmp_path):
    """The epilogues' counters, coherent read-backs and extra bindings, eager and replayed (two steps in flight),
    under the Khronos validation layer with synchronization validation: no message."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_vulkan_runtime import VALIDATION_DIR

    manifest = VALIDATION_DIR / "usr/share/vulkan/explicit_layer.d/VkLayer_khronos_validation.json"
    if not manifest.exists():
        pytest.skip(f"Khronos validation layer not extracted at {VALIDATION_DIR}")
    env = dict(os.environ, VK_LAYER_PATH=str(manifest.parent), VK_INSTANCE_LAYERS="VK_LAYER_KHRONOS_validation",
               VK_LOADER_DEBUG="layer",
               VK_LAYER_ENABLES="VK_VALIDATION_FEATURE_ENABLE_SYNCHRONIZATION_VALIDATION_EXT",
               LD_LIBRARY_PATH=f"{VALIDATION_DIR / 'usr/lib/x86_64-linux-gnu'}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    res = subprocess.run([sys.executable, "-c", EPILOGUE_RUN, str(tmp_path), str(Path(__file__).parent)], env=env,
                         capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert 'Insert instance layer "VK_LAYER_KHRONOS_validation"' in log and "done" in res.stdout
    messages = [ln for ln in log.splitlines()
                if "Validation" in ln and ("Error" in ln or "Warning" in ln) or "VUID-" in ln or "SYNC-HAZARD" in ln]
    assert not messages, "\n".join(messages[:20])


def test_epilogues_without_subgroups(tmp_path, gen):
    """The shared-memory reductions (devices without subgroup arithmetic): the readers' 1 / rms and the chunks."""
    import json

    from llmopt.backends.vulkan import compile as vk_compile

    probe = json.loads(json.dumps(PROBE))
    probe["features"]["subgroup_arithmetic"] = False
    assert vk_compile.compile_shaders(vk_compile.REPO_SHADERS, tmp_path, probe)["defines"]["USE_SUBGROUP"] == 0
    be = vulkan.VulkanBackend(kernel_dir=tmp_path)
    try:
        for key in ("matvec_int_dot", "matvec_x_q8", "fuse_gated_act", "fuse_matvec_norm"):
            setattr(be, key, True)
        n, k, f, m = 160, 96, 96, 3
        wo = be.linear_weight("o", random_qt(n, k, 4, 32, False, torch.float16, gen))
        gq, uq = (random_qt(f, n, 4, 32, True, torch.float16, gen) for _ in range(2))
        gate, up = be.linear_weight("g", gq), be.linear_weight("u", uq)
        nw_host = torch.randn(n, generator=gen)
        x, res = be.from_host(torch.randn(1, m, k, generator=gen)), be.from_host(torch.randn(1, m, n, generator=gen))
        total, normed = be.linear_add_rmsnorm(x, wo, res, be.param("nw", nw_host), 1e-6, False, (gate, up))
        assert normed.rms is not None
        vals, inv = norm_reference(be.to_host(total), nw_host, 1e-6, 0.0)
        xq = int8_chunks(vals) * inv[:, None]
        out = be.gated_linears(normed, gate, up, "gelu_tanh")
        assert out.q8 is not None
        ref = ACTS["gelu_tanh"](xq @ gq.dequantize(torch.float64).T) * (xq @ uq.dequantize(torch.float64).T)
        assert rel_err(be.to_host(out).reshape(m, f), ref) < RTOL
        codes, _, _ = read_x8(be, out)
        want, _ = x8_reference(be.to_host(out).reshape(m, f))
        assert (codes - want).abs().max() <= 1
        assert counters_zero(be)
    finally:
        be.close()
