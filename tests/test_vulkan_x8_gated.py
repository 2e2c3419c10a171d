"""x written as int8 by the ops before a mat-vec (x8 rows, ``shaders/x8.glsl``), the gated gate/up mat-vec
(``VulkanBackend.gated_linears``), on lavapipe (forced on; GPUs pick them through ``compile.device_config``).

Tolerances (float64 references on fresh random inputs, odd sizes):
* int-dot mat-vecs against a reference that quantizes x as the shader does (``int8_chunks``): relative error below
  ``RTOL`` = 2e-5; float-path mat-vecs against plain x: the same;
* a mat-vec reading x8 rows against the same mat-vec quantizing float x itself: identical (one quantizer, one
  formula), and so are whole-model logits with x8 rows and the gated epilogue on against off;
* the x8 rows' bytes against a torch re-quantization of the norm's float output: codes within 1 (the device's
  127 / max|x| may be one ulp off), at most 1% of them off by one, scales within 1e-6 relative, and each chunk's
  stored code sum equal to the sum of its stored codes.
"""

from __future__ import annotations

import pytest
import torch

from llmopt.engine import load_model
from llmopt.errors import LlmoptError
from llmopt.quant.quantizers import Spec

from vulkan_device import require_vulkan
vulkan = require_vulkan("integer_dot_product")
from llmopt.backends.vulkan.backend import MATVEC_MAX_M, int8_chunks  # noqa: E402
from test_vulkan_ops import random_qt, rel_err  # noqa: E402
from tiny_models import COMMON, FAMILIES, pack_folder, save_random  # noqa: E402

pytestmark = pytest.mark.vulkan
PROBE = vulkan.probe()

RTOL = 2e-5
ACTS = {"silu": torch.nn.functional.silu, "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
        "gelu": torch.nn.functional.gelu, "quick_gelu": lambda v: v * torch.sigmoid(1.702 * v)}


@pytest.fixture
def fast(be, monkeypatch):
    """The GPU configuration: int-dot mat-vecs, x8 rows from the norms, the gated epilogue."""
    for key in ("matvec_int_dot", "matvec_x_q8", "fuse_gated_act"):
        monkeypatch.setattr(be, key, True)
    return be


def x8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [rows, chunks, 32] (value order) and scales [rows, chunks] of float32 rows ``x``, as x8.glsl makes them."""
    chunks = x.float().reshape(x.shape[0], -1, 32)
    amax = chunks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    return torch.round(chunks * inv).clamp(-127, 127).to(torch.int32), (amax / 127.0)[..., 0]


def read_x8(be, act) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The x8 rows of ``act`` decoded from the device: codes [rows, chunks, 32] in value order, scales, code sums."""
    rows, k = act.rows, act.features
    n_chunks, per_row = k // 32, 40 * -(-k // 128)
    words = torch.from_numpy(be.dev.download(act.q8, 4 * rows * per_row, dtype="uint32").astype("int64"))
    words = words.view(rows, -1, 40)  # blocks of 4 chunks: 4 x 8 code words, then (d, qsum) x 4
    codes = words[..., :32].reshape(rows, -1, 8)[:, :n_chunks]  # word i*2+s, byte b: value 8i + s + 2b
    byte = torch.stack([(codes >> (8 * b)) & 0xFF for b in range(4)], -1)  # [rows, chunks, word, b]
    byte = torch.where(byte > 127, byte - 256, byte)
    values = torch.empty(rows, n_chunks, 32, dtype=torch.int64)
    for word in range(8):
        i, s = divmod(word, 2)
        for b in range(4):
            values[..., 8 * i + s + 2 * b] = byte[..., word, b]
    tail = words[..., 32:].reshape(rows, -1, 2)[:, :n_chunks]
    scales = tail[..., 0].to(torch.int32).view(torch.float32)
    sums = tail[..., 1].to(torch.int32)
    return values, scales, sums


@pytest.mark.parametrize("k", [96, 288, 512])  # 3 chunks (a partial block of 4), 9 chunks, 4 whole blocks
@pytest.mark.parametrize("m", [1, 3])
def test_ops_write_x8_rows(fast, gen, monkeypatch, k, m):
    be = fast
    monkeypatch.setattr(be, "wg", 32)  # gated_act quantizes its workgroup's own chunks: 32 values or more
    x, r = torch.randn(1, m, k, generator=gen) * 2, torch.randn(1, m, k, generator=gen)
    w = be.param("norm", torch.randn(k, generator=gen))
    outs = [be.rmsnorm(be.from_host(x), w, 1e-6, True),
            be.add_rmsnorm(be.from_host(x), be.from_host(r), w, 1e-6, False)[1],
            be.gated_act(be.from_host(x), be.from_host(r), "gelu_tanh")]
    for out in outs:
        assert out.q8 is not None
        values, scales, sums = read_x8(be, out)
        want, want_scales = x8_reference(be.to_host(out).reshape(m, k))
        diff = (values - want).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01
        assert rel_err(scales, want_scales) < 1e-6
        assert torch.equal(sums, values.sum(-1).to(torch.int32))


def test_x8_rows_only_where_an_int_dot_matvec_can_read_them(be, fast, gen, monkeypatch):
    monkeypatch.setattr(be, "wg", 32)
    w = be.param("n", torch.ones(64))
    x = be.from_host(torch.randn(1, 1, 64, generator=gen))
    assert be.rmsnorm(x, w, 1e-6, False).q8 is not None
    assert be.rmsnorm(x, be.param("h", torch.ones(16)), 1e-6, False, group=16).q8 is None  # per-head QK-norm
    odd = be.from_host(torch.randn(1, 1, 40, generator=gen))
    assert be.rmsnorm(odd, be.param("o", torch.ones(40)), 1e-6, False).q8 is None  # not a multiple of 32
    prefill = be.from_host(torch.randn(1, MATVEC_MAX_M + 1, 64, generator=gen))
    assert be.rmsnorm(prefill, w, 1e-6, False).q8 is None  # the tiled matmul reads float x
    assert be.gated_act(x, x, "silu").q8 is not None
    monkeypatch.setattr(be, "wg", 64)  # gated_act: a workgroup would straddle two rows of 96
    straddle = be.from_host(torch.randn(1, 2, 96, generator=gen))
    assert be.gated_act(straddle, straddle, "silu").q8 is None
    monkeypatch.setattr(be, "wg", 16)  # half a chunk a workgroup
    assert be.gated_act(x, x, "silu").q8 is None
    monkeypatch.setattr(be, "wg", 32)
    monkeypatch.setitem(be.probe["device"], "max_shared_memory_bytes", 4 * (64 + 2 + be.wg_reduce) - 4)
    assert be.rmsnorm(x, w, 1e-6, False).q8 is None  # the row does not fit the norm's shared memory: float only
    assert be.gated_act(x, x, "silu").q8 is not None  # 32 values a workgroup still do
    monkeypatch.undo()
    monkeypatch.setattr(be, "matvec_x_q8", True)
    monkeypatch.setattr(be, "matvec_int_dot", False)
    assert be.rmsnorm(x, w, 1e-6, False).q8 is None


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matvec_on_x8_rows_equals_quantizing_in_the_matvec(fast, gen, bits):
    be = fast
    for n_out, k, group, sym, sdt in [(37, 96, 32, True, torch.float16), (45, 128, 64, False, torch.bfloat16),
                                      (61, 288, 96, False, torch.float16), (20, 160, 160, True, torch.bfloat16)]:
        qt = random_qt(n_out, k, bits, group, sym, sdt, gen)
        bias = torch.randn(n_out, generator=gen)
        wt = be.linear_weight("w", qt, bias)
        a, b = (be.from_host(torch.randn(1, 3, k, generator=gen)) for _ in range(2))
        x = be.add_rmsnorm(a, b, be.param("n", torch.randn(k, generator=gen)), 1e-6, False)[1]
        xh = be.to_host(x)
        out = be.to_host(be.linear(x, wt))  # 4 bits: x8 rows; others: float x quantized (2, 8) or exact (3)
        plain = be.to_host(be.linear(be.from_host(xh), wt))  # the same x without x8 rows
        case = (bits, n_out, k, group, sym, sdt)
        assert torch.equal(out, plain), case
        ref = (xh.double() if bits == 3 else int8_chunks(xh)) @ qt.dequantize(torch.float64).T + bias.double()
        assert rel_err(out, ref) < RTOL, case


def test_x8_rows_feed_every_piece_of_a_split_weight(fast, gen, monkeypatch):
    be = fast
    max_range = be.dev.max_range
    monkeypatch.setattr(be.dev, "max_range", 1024)  # 128 B a row: rows in pieces of 8
    qt = random_qt(70, 256, 4, 32, True, torch.bfloat16, gen)
    w = be.linear_weight("big", qt)
    monkeypatch.setattr(be.dev, "max_range", max_range)
    assert len(w.pieces) == 9
    x = be.rmsnorm(be.from_host(torch.randn(1, 2, 256, generator=gen)), be.param("n", torch.ones(256)), 1e-6, False)
    assert x.q8 is not None
    xh = be.to_host(x)
    out = be.to_host(be.linear(x, w))
    assert torch.equal(out, be.to_host(be.linear(be.from_host(xh), w)))
    assert rel_err(out, int8_chunks(xh) @ qt.dequantize(torch.float64).T) < RTOL


def test_logits_read_the_last_rows_x8(fast, gen):
    be = fast
    qt = random_qt(75, 128, 4, 128, True, torch.float16, gen)
    head = be.linear_weight("head", qt)
    x = be.rmsnorm(be.from_host(torch.randn(2, 3, 128, generator=gen)), be.param("n", torch.randn(128, generator=gen)),
                   1e-6, True)
    assert x.q8 is not None
    last = be.to_host(x)[:, -1]
    out = be.to_host(be.logits_device(x, head, softcap=5.0))
    ref = 5.0 * torch.tanh(int8_chunks(last) @ qt.dequantize(torch.float64).T / 5.0)
    assert rel_err(out, ref) < RTOL


def gated_reference(x, gate, up, bg, bu, kind, quantized: bool):
    xr = int8_chunks(x) if quantized else x.double()
    g = xr @ gate.T + (bg.double() if bg is not None else 0.0)
    u = xr @ up.T + (bu.double() if bu is not None else 0.0)
    return ACTS[kind](g) * u


@pytest.mark.parametrize("kind", list(ACTS))
@pytest.mark.parametrize("bits,int_dot", [(4, True), (4, False), (8, True), (3, False), (32, False)])
def test_gated_linears(fast, gen, monkeypatch, kind, bits, int_dot):
    be = fast
    monkeypatch.setattr(be, "matvec_int_dot", int_dot)
    # sizes whose scale rows stay on the offset alignment (so gate and up fuse); 46 is not a multiple of the
    # gate rows a set holds (clamped rows)
    for f, k, m, biases in [(40, 96, 1, (True, False)), (46, 128, 3, (False, True)), (56, 160, 8, (False, False))]:
        if bits == 32:
            mats = [torch.randn(f, k, generator=gen) * 0.2 for _ in range(2)]
            dense = [w.double() for w in mats]
        else:
            mats = [random_qt(f, k, bits, 32, bits == 4, torch.float16, gen) for _ in range(2)]
            dense = [w.dequantize(torch.float64) for w in mats]
        bs = [torch.randn(f, generator=gen) if b else None for b in biases]
        gate, up = (be.linear_weight(n, w, b) for n, w, b in zip(("gate", "up"), mats, bs))
        x = torch.randn(1, m, k, generator=gen)
        out = be.gated_linears(be.from_host(x), gate, up, kind)
        assert be._fused[(id(gate), id(up))][1] is not None and out.shape == (1, m, f)
        ref = gated_reference(x, *dense, *bs, kind, int_dot and bits != 3)
        case = (kind, bits, int_dot, f, k, m)
        assert rel_err(be.to_host(out), ref) < RTOL, case
        # the same values as the separate mat-vec and gated_act
        monkeypatch.setattr(be, "fuse_gated_act", False)
        separate = be.to_host(be.gated_linears(be.from_host(x), gate, up, kind))
        monkeypatch.setattr(be, "fuse_gated_act", True)
        assert torch.equal(be.to_host(out), separate), case


@pytest.mark.parametrize("layout", [(64, 0, 16), (32, 16, 4), (16, 0, 8), (16, 0, 2), (16, 4, 2), (64, 16, 6)])
def test_gated_specializations(fast, gen, monkeypatch, layout):
    """The gated mat-vec's own layout (``gated_layout``: wg, invocations a set, rows a set), whatever the other
    mat-vecs use; here none with whole 32-value chunks a workgroup (those: test_vulkan_gated_x8.py)."""
    be = fast
    monkeypatch.setattr(be, "gated_layout", layout)
    for key, value in (("wg", 16), ("rows_per_wg", 1), ("matvec_split", 0), ("matvec_min_groups", 64)):
        monkeypatch.setattr(be, key, value)  # the ungated mat-vecs' knobs: no effect on the gated one
    # 40 outputs: no whole row sets, and [gate; up] fuses (its scale rows end on the 16-byte alignment)
    qts = [random_qt(40, 192, 4, 64, False, torch.bfloat16, gen) for _ in range(2)]
    gate, up = (be.linear_weight(n, q) for n, q in zip(("g", "u"), qts))
    x = torch.randn(1, 2, 192, generator=gen)
    out = be.to_host(be.gated_linears(be.from_host(x), gate, up, "gelu_tanh"))
    assert be._fused[(id(gate), id(up))][1] is not None  # the gated mat-vec ran, not linears + gated_act
    ref = gated_reference(x, *(q.dequantize(torch.float64) for q in qts), None, None, "gelu_tanh", True)
    assert rel_err(out, ref) < RTOL, layout


def test_gated_linears_falls_back(fast, gen):
    be = fast
    qts = [random_qt(24, 64, 4, 32, True, torch.float16, gen) for _ in range(2)]
    gate, up = (be.linear_weight(n, q) for n, q in zip(("fg", "fu"), qts))
    x = torch.randn(1, MATVEC_MAX_M + 3, 64, generator=gen)  # prefill: the tiled matmul, then gated_act
    out = be.to_host(be.gated_linears(be.from_host(x), gate, up, "silu"))
    dense = [q.dequantize(torch.float64) for q in qts]
    assert rel_err(out, gated_reference(x, *dense, None, None, "silu", False)) < RTOL
    other = be.linear_weight("other", random_qt(24, 64, 8, 32, True, torch.float16, gen))  # does not fuse with int4
    x = torch.randn(1, 1, 64, generator=gen)
    out = be.to_host(be.gated_linears(be.from_host(x), gate, other, "silu"))
    assert be._fused[(id(gate), id(other))][1] is None and out.shape == (1, 1, 24)
    with pytest.raises(LlmoptError, match=r"gated_linears fg\+fu: input has 48 features, weights expect 64"):
        be.gated_linears(be.from_host(torch.randn(1, 1, 48, generator=gen)), gate, up, "silu")
    with pytest.raises(LlmoptError, match="activation 'relu' is not supported"):
        be.gated_linears(be.from_host(x), gate, up, "relu")


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gemma3"])
def test_tiny_model_x8_and_gated_change_no_bit(be, tmp_path, monkeypatch, family):
    """Whole models, int4 (int-dot): x8 rows (norms, gated_act) and the gated epilogue, each on, give the same logits,
    bit for bit, as both off, eager and replayed."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    folder = pack_folder(save_random(FAMILIES[family](), tmp_path / "f", seed), tmp_path / "q",
                         [Spec(4, 32, sym=False)])
    model = load_model(folder, backend=be)
    ids = torch.randint(0, COMMON["vocab_size"], (1, 12))
    monkeypatch.setattr(be, "matvec_int_dot", True)
    monkeypatch.setattr(be, "wg", 32)  # gated_act writes x8 rows for the down projection (gated epilogue off)
    runs = {}
    for on in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(be, "matvec_x_q8", on[0])
        monkeypatch.setattr(be, "fuse_gated_act", on[1])
        for replay in (False, True):
            model.static_decode = replay
            logits, state = model.prefill(ids[:, :4], max_len=ids.shape[1] + 1)
            steps = [model.decode_step(state, ids[:, t]) for t in range(4, ids.shape[1])]
            assert state.decode_path == ("replayed" if replay else "eager: Model.static_decode is off")
            runs[on, replay] = torch.stack([logits, *steps])
    name = f"{family} seed={seed}"
    for key, got in runs.items():
        assert torch.equal(got, runs[(False, False), False]), f"{name}: {key} differs from x8 rows and gated off, eager"


def test_device_config_turns_x8_rows_on_with_the_int_dot_matvec():
    from llmopt.backends.vulkan import compile as vk_compile

    gpu = {"device": {"type": "discrete_gpu", "subgroup_size": 32, "max_workgroup_invocations": 1024},
           "features": {"subgroup_arithmetic": True, "integer_dot_4x8_signed_accelerated": True}}
    spec = vk_compile.device_config(gpu)["spec"]
    picked = (spec["matvec_int_dot"], spec["matvec_x_q8"], spec["matvec_gated"], spec["wg"], spec["rows"])
    assert picked == (1, 1, 1, 64, 4) and spec["matvec_gated_layout"] == [256, 16, 4]  # 32 gated outputs a workgroup
    gpu["features"]["integer_dot_4x8_signed_accelerated"] = False  # no fast dot: float mat-vec, nothing reads x8 rows
    spec = vk_compile.device_config(gpu)["spec"]
    assert (spec["matvec_x_q8"], spec["matvec_gated"]) == (0, 0)
    assert vk_compile.device_config(PROBE)["spec"]["matvec_x_q8"] == 0  # lavapipe emulates the dot
