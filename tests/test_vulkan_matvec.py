"""The mat-vec's int-dot variant (``matvec_quant_idot``) and fused linears (``VulkanBackend.linears``), on lavapipe.

lavapipe has shaderIntegerDotProduct but does not accelerate it, so the compile stage's default there is the float
path; these tests force the variant (``be.matvec_int_dot = True``) so CI checks it. Tolerances:

* int-dot against a float64 reference that quantizes x the same way (int8 per 32 values, scale max|x| / 127,
  round half to even): relative error below ``RTOL`` = 2e-5 (float32 accumulation, as for the float path);
* int-dot against the plain float64 reference: below ``RTOL_X8`` = 2e-2 (x's int8 rounding, ~0.3-0.8% measured);
* fused linears against one ``linear`` per weight: ``RTOL``.
Whole tiny models with every linear int4/int8 and the variant forced, decoding on the CPU's greedy tokens: each
step's logits within relative error ``MODEL_RTOL`` = 6e-2 of the CPU float reference (measured 1.2-3.3% over 4
random layers of every family, 0.0 without the variant: x's int8 rounding compounds through the layers), and the
greedy token the CPU's, or one the CPU scores within ``TIE_GAP`` = 2% of its logit range of its own best (random
tiny models have near-ties: flips measured only at gaps of 0.1-0.3% of the range, with logit deviations of 0.4-1.4%
of it; how many steps land on such a tie is chance, so it is not counted).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmopt.engine import load_model
from llmopt.errors import LlmoptError
from llmopt.quant.quantizers import Spec

from vulkan_device import require_vulkan
vulkan = require_vulkan("integer_dot_product")
from llmopt.backends.vulkan import compile as vk_compile  # noqa: E402
from llmopt.backends.vulkan.backend import int8_chunks  # noqa: E402
from test_vulkan_ops import random_qt, rel_err  # noqa: E402
from tiny_models import COMMON, FAMILIES, pack_folder, save_random  # noqa: E402

pytestmark = pytest.mark.vulkan
PROBE = vulkan.probe()

RTOL, RTOL_X8, MODEL_RTOL, TIE_GAP = 2e-5, 2e-2, 6e-2, 2e-2


@pytest.fixture
def int_dot(be):
    be.matvec_int_dot = True
    yield be
    be.matvec_int_dot = False


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 8])  # 8 = the largest batch the mat-vec takes (MATVEC_MAX_M)
def test_int_dot_matvec(int_dot, gen, bits, m):
    be = int_dot
    for n_out, k, group, sym, sdt in [(37, 96, 32, True, torch.float16), (45, 128, 64, False, torch.bfloat16),
                                      (20, 160, 160, True, torch.bfloat16), (61, 256, 128, False, torch.float16)]:
        qt = random_qt(n_out, k, bits, group, sym, sdt, gen)
        bias = torch.randn(n_out, generator=gen)
        x = torch.randn(1, m, k, generator=gen) * torch.rand(1, m, k, generator=gen) * 3  # uneven magnitudes
        out = be.to_host(be.linear(be.from_host(x), be.linear_weight("w", qt, bias)))
        w64 = qt.dequantize(torch.float64)
        case = (bits, m, n_out, k, group, sym, sdt)
        assert rel_err(out, int8_chunks(x) @ w64.T + bias.double()) < RTOL, case
        assert rel_err(out, x.double() @ w64.T + bias.double()) < RTOL_X8, case


@pytest.mark.parametrize("dot", [False, True])
def test_long_rows_widen_the_workgroup(be, gen, monkeypatch, dot):
    """``matvec_wg_max`` (GPUs: 256) doubles a long row's workgroup while each invocation keeps >= 2 chunks."""
    monkeypatch.setattr(be, "matvec_wg_max", 4 * be.wg)
    monkeypatch.setattr(be, "matvec_int_dot", dot)
    assert be._matvec_wg(32 * 4 * be.wg - 32) == be.wg  # one chunk short of 2 chunks at 2 * wg
    assert be._matvec_wg(32 * 4 * be.wg) == 2 * be.wg
    assert be._matvec_wg(32 * 8 * be.wg + 96) == 4 * be.wg  # capped by matvec_wg_max
    for n_out, k in [(19, 32 * 4 * be.wg + 64), (7, 32 * 8 * be.wg + 96)]:
        qt = random_qt(n_out, k, 4, 32, False, torch.float16, gen)
        x = torch.randn(1, 2, k, generator=gen)
        out = be.to_host(be.linear(be.from_host(x), be.linear_weight("long", qt)))
        ref = (int8_chunks(x) if dot else x.double()) @ qt.dequantize(torch.float64).T
        assert rel_err(out, ref) < RTOL, (n_out, k, dot)


def test_int_dot_row_tail_zero_chunks_and_pieces(int_dot, gen, monkeypatch):
    be = int_dot
    qt = random_qt(29, 72, 4, 72, False, torch.float16, gen)  # 2 whole chunks + an 8-value float tail
    x = torch.randn(3, 1, 72, generator=gen)
    x[0, 0, :32] = 0.0  # an all-zero chunk: scale 0, no division by zero
    out = be.to_host(be.linear(be.from_host(x), be.linear_weight("tail", qt)))
    assert torch.isfinite(out).all()
    assert rel_err(out, int8_chunks(x) @ qt.dequantize(torch.float64).T) < RTOL
    monkeypatch.setattr(be.dev, "max_range", 1024)  # 128 B a row: rows in pieces of 8
    qt = random_qt(70, 256, 4, 32, True, torch.bfloat16, gen)
    w = be.linear_weight("big", qt)
    monkeypatch.undo()
    assert len(w.pieces) == 9
    x = torch.randn(1, 2, 256, generator=gen)
    out = be.to_host(be.linear(be.from_host(x), w))
    assert rel_err(out, int8_chunks(x) @ qt.dequantize(torch.float64).T) < RTOL


def test_int_dot_leaves_3bit_and_float_on_the_float_path(int_dot, gen):
    be = int_dot
    qt = random_qt(33, 96, 3, 32, False, torch.float16, gen)
    x = torch.randn(1, 1, 96, generator=gen)
    out = be.to_host(be.linear(be.from_host(x), be.linear_weight("w3", qt)))
    assert rel_err(out, x.double() @ qt.dequantize(torch.float64).T) < RTOL  # exact x: not quantized
    wf = torch.randn(19, 96, generator=gen)
    out = be.to_host(be.linear(be.from_host(x), be.linear_weight("wf", wf)))
    assert rel_err(out, x.double() @ wf.double().T) < RTOL


@pytest.mark.parametrize("bits", [3, 4, 32])  # 32: float32 weights
@pytest.mark.parametrize("m", [1, 13])  # mat-vec and the tiled prefill matmul
def test_fused_linears_match_separate(be, gen, bits, m):
    k = 128
    if bits == 32:
        mats = [torch.randn(n, k, generator=gen) for n in (64, 32, 16)]
    else:
        mats = [random_qt(n, k, bits, 32, bits == 4, torch.bfloat16, gen) for n in (64, 32, 16)]
    biases = [torch.randn(64, generator=gen), None, torch.randn(16, generator=gen)]  # some with bias, one without
    ws = [be.linear_weight(f"w{i}", w, b) for i, (w, b) in enumerate(zip(mats, biases))]
    dense = [w.double() if bits == 32 else w.dequantize(torch.float64) for w in mats]
    before = be.weight_bytes
    x = torch.randn(2, m, k, generator=gen)
    outs = be.linears(be.from_host(x), ws)
    assert be._fused[tuple(id(w) for w in ws)][1] is not None  # one dispatch for the three
    assert be.weight_bytes - before <= 4 * 112 + 16  # only the fused bias is new: weights are not doubled
    for out, w, b in zip(outs, dense, biases):
        ref = x.double() @ w.T + (b.double() if b is not None else 0.0)
        assert out.shape == (2, m, w.shape[0]) and rel_err(be.to_host(out), ref) < RTOL
    # the originals now read their rows of the fused buffer; fused again on the next call, not re-made
    x = torch.randn(1, m, k, generator=gen)
    assert rel_err(be.to_host(be.linear(be.from_host(x), ws[1])), x.double() @ dense[1].T) < RTOL
    again = be.linears(be.from_host(x), ws)
    assert rel_err(be.to_host(again[2]), x.double() @ dense[2].T + biases[2].double()) < RTOL


def test_fused_linears_with_int_dot(int_dot, gen):
    be = int_dot
    qts = [random_qt(n, 96, 4, 32, False, torch.float16, gen) for n in (48, 16)]
    ws = [be.linear_weight(f"gu{i}", q) for i, q in enumerate(qts)]
    x = torch.randn(1, 1, 96, generator=gen)
    for out, q in zip(be.linears(be.from_host(x), ws), qts):
        assert rel_err(be.to_host(out), int8_chunks(x) @ q.dequantize(torch.float64).T) < RTOL


def test_unfusable_linears_run_separately(be, gen, monkeypatch):
    x = torch.randn(1, 1, 64, generator=gen)
    cases = {
        "bit widths differ": [random_qt(32, 64, 4, 32, True, torch.float16, gen),
                              random_qt(32, 64, 8, 32, True, torch.float16, gen)],
        "scale dtypes differ": [random_qt(32, 64, 4, 32, True, torch.float16, gen),
                                random_qt(32, 64, 4, 32, True, torch.bfloat16, gen)],
        "misaligned rows": [random_qt(3, 64, 4, 64, True, torch.float16, gen),  # 3 scale rows = 6 bytes
                            random_qt(5, 64, 4, 64, True, torch.float16, gen)],
    }
    for why, qts in cases.items():
        ws = [be.linear_weight(f"u{i}", q) for i, q in enumerate(qts)]
        outs = be.linears(be.from_host(x), ws)
        assert be._fused[tuple(id(w) for w in ws)][1] is None, why
        for out, q in zip(outs, qts):
            assert rel_err(be.to_host(out), x.double() @ q.dequantize(torch.float64).T) < RTOL, why
    monkeypatch.setattr(be.dev, "max_range", 512)  # 32 B a row: weights of 40 rows come in 3 pieces
    ws = [be.linear_weight(f"p{i}", random_qt(40, 64, 4, 32, True, torch.float16, gen)) for i in range(2)]
    monkeypatch.undo()
    be.linears(be.from_host(x), ws)
    assert be._fused[tuple(id(w) for w in ws)][1] is None, "pieces"


def test_int_dot_needs_its_spirv(be, gen, tmp_path):
    probe = json.loads(json.dumps(PROBE))
    probe["features"]["integer_dot_4x8_signed_accelerated"] = True  # a GPU: the compile stage picks the variant
    assert vk_compile.device_config(probe)["spec"]["matvec_int_dot"] == 1
    assert vk_compile.device_config(PROBE)["spec"]["matvec_int_dot"] == 0  # lavapipe emulates the dot
    manifest = vk_compile.compile_shaders(vk_compile.REPO_SHADERS, tmp_path, probe)
    assert manifest["spec"]["matvec_int_dot"] == 1
    gpu_like = vulkan.VulkanBackend(kernel_dir=tmp_path)
    try:
        assert gpu_like.matvec_int_dot
        qt = random_qt(24, 64, 4, 32, True, torch.float16, gen)
        x = torch.randn(1, 1, 64, generator=gen)
        out = gpu_like.to_host(gpu_like.linear(gpu_like.from_host(x), gpu_like.linear_weight("w", qt)))
        assert rel_err(out, int8_chunks(x) @ qt.dequantize(torch.float64).T) < RTOL
    finally:
        gpu_like.close()
    (tmp_path / "matvec_quant_idot.spv").unlink()
    with pytest.raises(LlmoptError, match=r"matvec_quant_idot\.spv: SPIR-V for shader 'matvec_quant_idot' is missing"):
        vk_compile.check_manifest(tmp_path)


@pytest.mark.parametrize("family,bits", [("qwen2", 4), ("gemma2", 8), ("gemma3", 4)])
def test_tiny_model_with_int_dot_forced(int_dot, tmp_path, family, bits):
    from llmopt.backends.cpu import CpuBackend

    seed = int(torch.randint(0, 2**31 - 1, ()))
    # every 2-D weight int``bits`` g32 asym: every linear takes the int-dot path, q/k/v and gate/up can fuse
    folder = pack_folder(save_random(FAMILIES[family](), tmp_path / "f", seed), tmp_path / "q", [Spec(bits, 32, sym=False)])
    name = f"{family} int{bits} seed={seed}"
    fused_before = sum(f is not None for _, f in int_dot._fused.values())
    vk_model, cpu_model = load_model(folder, backend=int_dot), load_model(folder, backend=CpuBackend(quant="reference"))
    ids = torch.randint(0, COMMON["vocab_size"], (1, 6))
    logits, state = vk_model.prefill(ids, max_len=20)
    ref_logits, ref_state = cpu_model.prefill(ids, max_len=20)
    for step in range(12):  # greedy on the CPU's tokens, so one flip does not change what follows
        assert rel_err(logits, ref_logits) < MODEL_RTOL, f"{name} step {step}: {rel_err(logits, ref_logits):.2e}"
        ref = ref_logits[0]
        shortfall = float(ref.max() - ref[logits[0].argmax()]) / float(ref.max() - ref.min())
        assert shortfall < TIE_GAP, f"{name} step {step}: greedy token {shortfall:.1%} of the range below the CPU's best"
        token = ref_logits.argmax(-1)
        logits, ref_logits = vk_model.decode_step(state, token), cpu_model.decode_step(ref_state, token)
    layers = vk_model.args.n_layers
    assert sum(f is not None for _, f in int_dot._fused.values()) - fused_before == 2 * layers  # q/k/v, gate/up
    assert math.isfinite(float(logits.abs().max()))


@pytest.mark.parametrize("wg,rows,split", [(64, 32, 0), (32, 16, 16)])  # GPU-style sizes, whole-workgroup and split sets
def test_int_dot_other_specializations(int_dot, gen, wg, rows, split):
    be = int_dot
    saved = be.wg, be.rows_per_wg, be.matvec_split, be.matvec_min_groups
    be.wg, be.rows_per_wg, be.matvec_split, be.matvec_min_groups = wg, rows, split, 1
    try:
        for bits in (4, 8):
            qt = random_qt(101, 192, bits, 64, bits == 4, torch.float16, gen)
            x = torch.randn(1, 2, 192, generator=gen)
            out = be.to_host(be.linear(be.from_host(x), be.linear_weight("s", qt)))
            assert rel_err(out, int8_chunks(x) @ qt.dequantize(torch.float64).T) < RTOL, (bits, wg, rows, split)
    finally:
        be.wg, be.rows_per_wg, be.matvec_split, be.matvec_min_groups = saved


def test_linears_first_seen_while_recording_stay_separate(be, gen):
    """Fusing submits device copies, which a replayable recording forbids: inside one the weights run separately
    (the recording stays valid), and the next eager call fuses them."""
    qts = [random_qt(n, 64, 4, 32, True, torch.float16, gen) for n in (32, 16)]
    ws = [be.linear_weight(f"r{i}", q) for i, q in enumerate(qts)]
    x = be.from_host(torch.randn(1, 1, 64, generator=gen))
    be.dev.begin_recording()
    try:
        outs = be.linears(x, ws)
    finally:
        rec = be.dev.end_recording()
    assert tuple(id(w) for w in ws) not in be._fused
    be.dev.submit((rec,))
    xh = be.to_host(x)
    for out, q in zip(outs, qts):
        assert rel_err(be.to_host(out), xh.double() @ q.dequantize(torch.float64).T) < RTOL
    be.linears(x, ws)
    assert be._fused[tuple(id(w) for w in ws)][1] is not None


def test_bad_input_is_named(be, gen, monkeypatch):
    ws = [be.linear_weight(f"b{i}", random_qt(32, 64, 4, 32, True, torch.float16, gen)) for i in range(2)]
    with pytest.raises(LlmoptError, match=r"linears b0\+b1: input has 48 features, weights expect 64"):
        be.linears(be.from_host(torch.randn(1, 1, 48, generator=gen)), ws)
    monkeypatch.setitem(be.dev.features, "integer_dot_product", False)  # a device without the feature
    monkeypatch.setattr(be, "matvec_int_dot", True)
    with pytest.raises(LlmoptError, match="lacks shaderIntegerDotProduct"):
        be.linear(be.from_host(torch.randn(1, 1, 64, generator=gen)), ws[0])
