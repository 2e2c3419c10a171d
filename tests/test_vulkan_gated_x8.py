"""The gated gate/up mat-vec writing act(gate) * up also as x8 rows (``VulkanBackend.gated_linears`` with a
``gated_layout`` whose workgroups own whole 32-value chunks), on lavapipe, forced on.

Tolerances (fresh random inputs; output sizes that are not multiples of a workgroup's outputs included):
* the float output against a float64 reference that quantizes x as the shader does (``int8_chunks``) and against
  the separate mat-vec + ``gated_act`` path (whose row layout sums in another order): relative error below ``RTOL``
  = 2e-5;
* the x8 rows against a torch re-quantization of the float output: codes within 1, at most 1% off by one, scales
  within 1e-6 relative, each chunk's code sum equal to its codes' sum;
* a down projection reading those rows: equal bit for bit to the same mat-vec quantizing the float output itself
  (one quantizer), and within ``RTOL`` of the float64 reference;
* whole models: replayed logits equal to eager ones bit for bit, the gated path's within 1e-4 (relative, in norm) of
  the separate path's, with every gate/up product counted as the gated mat-vec writing x8 rows (a
  model that silently missed the path fails).
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
from test_vulkan_x8_gated import ACTS, read_x8, x8_reference  # noqa: E402
from tiny_models import COMMON, FAMILIES, pack_folder, save_random  # noqa: E402

pytestmark = pytest.mark.vulkan

RTOL = 2e-5


@pytest.fixture
def fast(be, monkeypatch):
    """The GPU configuration: int-dot mat-vecs, x8 rows, the gated epilogue; gated_act's workgroups of 32 (so the
    separate path writes x8 rows too)."""
    for key in ("matvec_int_dot", "matvec_x_q8", "fuse_gated_act"):
        monkeypatch.setattr(be, key, True)
    monkeypatch.setattr(be, "wg", 32)
    return be


def gate_up(be, gen, f: int, k: int, group: int = 32, bias: bool = False, bits: int = 4):
    qts = [random_qt(f, k, bits, group, False, torch.float16, gen) for _ in range(2)]
    bs = [torch.randn(f, generator=gen) if bias else None for _ in range(2)]
    gate, up = (be.linear_weight(n, q, b) for n, q, b in zip(("gate_proj", "up_proj"), qts, bs))
    return gate, up, [q.dequantize(torch.float64) for q in qts], bs


# layouts: 8 sets of 4 outputs (32 a workgroup), 4 sets of 8, 8 sets of 8 (64 outputs, so f = 96 and 160 leave the
# last workgroup one or three chunks), one set of 32 outputs (no subgroup sets), 16 sets of 2 in sets narrower than
# lavapipe's subgroups of 8 (sums through shared memory, as the GPU default's sets of 16 in subgroups of 32), and
# the GPU default
@pytest.mark.parametrize("layout", [(64, 8, 8), (32, 8, 16), (64, 8, 16), (32, 0, 64), (64, 4, 4), (256, 16, 4)])
@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
def test_gated_matvec_writes_x8_rows(fast, gen, monkeypatch, layout, kind):
    be = fast
    monkeypatch.setattr(be, "gated_layout", layout)
    for f, k, m, bias in [(96, 96, 1, True), (160, 288, 3, False), (64, 128, MATVEC_MAX_M, True)]:
        gate, up, dense, bs = gate_up(be, gen, f, k, bias=bias)
        x = torch.randn(1, m, k, generator=gen)
        out = be.gated_linears(be.from_host(x), gate, up, kind)
        case = (layout, kind, f, k, m)
        # the gated mat-vec wrote x8 rows (linears + gated_act, which writes them too, would leave no fused weight)
        assert be._fused[(id(gate), id(up))][1] is not None and out.q8 is not None, case
        y = be.to_host(out)
        xr = int8_chunks(x)
        g, u = (xr @ w.T + (b.double() if b is not None else 0.0) for w, b in zip(dense, bs))
        assert rel_err(y, ACTS[kind](g) * u) < RTOL, case
        values, scales, sums = read_x8(be, out)
        want, want_scales = x8_reference(y.reshape(m, f))
        diff = (values - want).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01, case
        assert rel_err(scales, want_scales) < 1e-6, case
        assert torch.equal(sums, values.sum(-1).to(torch.int32)), case
        # the separate path (its own row layout: other float sums' order)
        monkeypatch.setattr(be, "fuse_gated_act", False)
        sep = be.gated_linears(be.from_host(x), gate, up, kind)
        monkeypatch.setattr(be, "fuse_gated_act", True)
        assert sep.q8 is not None and rel_err(be.to_host(sep), y) < RTOL, case
        # the down projection reads them as it reads gated_act's
        down_qt = random_qt(k + 5, f, 4, 32, True, torch.float16, gen)
        down = be.linear_weight("down_proj", down_qt)
        got = be.to_host(be.linear(out, down))
        assert torch.equal(got, be.to_host(be.linear(be.from_host(y), down))), case
        assert rel_err(got, int8_chunks(y) @ down_qt.dequantize(torch.float64).T) < RTOL, case


def test_gated_x8_rows_only_where_whole_chunks(fast, gen, monkeypatch):
    be = fast
    x = be.from_host(torch.randn(1, 1, 64, generator=gen))
    gate, up, _, _ = gate_up(be, gen, 96, 64)
    assert be.gated_linears(x, gate, up, "silu").q8 is not None and be._fused[(id(gate), id(up))][1] is not None
    monkeypatch.setattr(be, "gated_layout", (32, 8, 8))  # 4 sets of 4: 16 outputs a workgroup, half a chunk
    assert be.gated_linears(x, gate, up, "silu").q8 is None
    monkeypatch.setattr(be, "gated_layout", (64, 8, 8))
    g40, u40, _, _ = gate_up(be, gen, 40, 64)  # 40 outputs: not whole chunks
    assert be.gated_linears(x, g40, u40, "silu").q8 is None
    g8, u8, _, _ = gate_up(be, gen, 96, 64, bits=8)  # x8 rows are in 4-bit order; the int8 mat-vec writes float
    assert be.gated_linears(x, g8, u8, "silu").q8 is None
    monkeypatch.setattr(be, "matvec_x_q8", False)
    assert be.gated_linears(x, gate, up, "silu").q8 is None
    monkeypatch.setattr(be, "matvec_x_q8", True)
    prefill = be.from_host(torch.randn(1, MATVEC_MAX_M + 1, 64, generator=gen))  # tiled matmul, then gated_act
    assert be.gated_linears(prefill, gate, up, "silu").q8 is None


@pytest.mark.parametrize("layout,message", [
    ((64, 8, 7), "even number of rows"), ((48, 8, 8), "power of two"), ((4096, 32, 8), "power of two up to"),
    ((64, 24, 8), "power of two dividing"), ((64, 0, 512), "shared memory")])
def test_bad_gated_layout_is_named(fast, gen, monkeypatch, layout, message):
    be = fast
    gate, up, _, _ = gate_up(be, gen, 64, 64)
    monkeypatch.setattr(be, "gated_layout", layout)
    with pytest.raises(LlmoptError, match=message):
        be.gated_linears(be.from_host(torch.randn(1, 1, 64, generator=gen)), gate, up, "silu")


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_tiny_model_gated_x8_changes_no_bit(be, tmp_path, monkeypatch, family):
    """Whole models, int4: the gated mat-vec writing x8 rows (every layer's, counted): replayed equals eager bit for
    bit, and both are the separate mat-vec + gated_act path's logits up to the float sums' order."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    folder = pack_folder(save_random(FAMILIES[family](), tmp_path / "f", seed), tmp_path / "q",
                         [Spec(4, 32, sym=False)])
    model = load_model(folder, backend=be)
    ids = torch.randint(0, COMMON["vocab_size"], (1, 10))
    for key in ("matvec_int_dot", "matvec_x_q8"):
        monkeypatch.setattr(be, key, True)
    monkeypatch.setattr(be, "wg", 32)  # the separate path's gated_act writes x8 rows too
    gated, ran = [], []  # per gate/up product: (ran as the gated mat-vec, has x8 rows); gated mat-vecs' outputs
    gated_linears, matmul = be.gated_linears, be._matmul

    def counted(x, *args):
        out = gated_linears(x, *args)
        gated.append((any(out is o for o in ran), out.q8 is not None))
        return out

    def counted_matmul(x, w, outs, *args, **kw):
        if kw.get("gated"):
            ran.append(outs[0])
        return matmul(x, w, outs, *args, **kw)

    monkeypatch.setattr(be, "_matmul", counted_matmul)
    monkeypatch.setattr(be, "gated_linears", counted)
    runs = {}
    for fused in (False, True):
        monkeypatch.setattr(be, "fuse_gated_act", fused)
        for replay in (False, True):
            gated.clear()
            model.static_decode = replay
            logits, state = model.prefill(ids[:, :4], max_len=ids.shape[1] + 1)
            steps = [model.decode_step(state, ids[:, t]) for t in range(4, ids.shape[1])]
            assert state.decode_path == ("replayed" if replay else "eager: Model.static_decode is off")
            assert gated and all(g == (fused, True) for g in gated), (fused, replay, gated)
            ran.clear()
            runs[fused, replay] = torch.stack([logits, *steps])
    name = f"{family} seed={seed}"
    for fused in (False, True):
        assert torch.equal(runs[fused, True], runs[fused, False]), f"{name}: replayed differs from eager, gated {fused}"
    assert rel_err(runs[True, False], runs[False, False]) < 1e-4, name
