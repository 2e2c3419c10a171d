"""K-part mat-vecs (``matvec_kparts`` for long rows, ``matvec_kparts_short`` for short grids): several workgroups
split a row set's K and the last to finish adds their partial sums (``shaders/matvec_quant.glsl``), on lavapipe.

Tolerances (float64 references on fresh random inputs, odd sizes): int-dot mat-vecs against a reference that
quantizes x as the shader does (``int8_chunks``), float-path mat-vecs (3-bit, float32 weights, int-dot off) against
plain x: relative error below ``RTOL`` = 2e-5 (float32 accumulation; the K parts only change the summation order).
The combine is deterministic: the same inputs give the same bits, replayed or eager.
"""

from __future__ import annotations

import pytest
import torch

from llmopt.engine import load_model
from llmopt.errors import LlmoptError
from llmopt.quant.quantizers import Spec

vulkan = pytest.importorskip("llmopt.backends.vulkan")
from llmopt.backends.vulkan import backend as vk_backend  # noqa: E402
from llmopt.backends.vulkan.backend import int8_chunks  # noqa: E402
from test_vulkan_ops import random_qt, rel_err  # noqa: E402
from tiny_models import COMMON, FAMILIES, pack_folder, save_random  # noqa: E402

pytestmark = pytest.mark.vulkan
PROBE = vulkan.probe()
if not PROBE["present"]:
    pytest.skip(f"no Vulkan device: {PROBE['reason']}", allow_module_level=True)
if not PROBE["features"].get("integer_dot_product"):
    pytest.skip("the Vulkan device lacks shaderIntegerDotProduct", allow_module_level=True)

RTOL = 2e-5
GATED, KPARTS = 8, 9  # places in the mat-vec's specialization (VulkanBackend._matmul)


@pytest.fixture(scope="module")
def be():
    backend = vulkan.VulkanBackend()
    yield backend
    backend.close()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run


@pytest.fixture
def kp(be, monkeypatch):
    """K parts on for short grids (every test shape here), 3 a row set, at lavapipe's sizes on any device."""
    for key, value in (("matvec_kparts_short", 3), ("matvec_min_groups", 1), ("wg", 16), ("matvec_wg_max", 16),
                       ("rows_per_wg", 8)):
        monkeypatch.setattr(be, key, value)
    return be


def kparts_used(be) -> set[int]:
    return {spec[KPARTS] for name, spec in be.dev.pipelines if name.startswith("matvec_quant")}


def reference(x: torch.Tensor, w64: torch.Tensor, dot: bool) -> torch.Tensor:
    return (int8_chunks(x) if dot else x.double()) @ w64.T


def counters_zero(be) -> bool:
    buf = be._counters[-1]
    return not be.dev.download(buf, buf.nbytes, dtype="uint32").any()


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 32])  # 32: float32 weights
@pytest.mark.parametrize("dot", [False, True])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_kparts_matvec(kp, gen, monkeypatch, bits, dot, m):
    be = kp
    monkeypatch.setattr(be, "matvec_int_dot", dot)
    monkeypatch.setattr(be, "matvec_x_q8", dot)
    # 16 lanes: 27, 42 and 17 chunks allow 3, 5 and 2 parts (half a chunk a lane), of 9, 9/9/9/9/6 and 9/8 chunks
    for n_out, k, group, sym, sdt, parts in [(37, 32 * 27, 32, True, torch.float16, 3),
                                             (45, 32 * 42, 64, False, torch.bfloat16, 5),
                                             (20, 32 * 17, 32 * 17, True, torch.bfloat16, 2)]:
        monkeypatch.setattr(be, "matvec_kparts_short", parts)
        if bits == 32:
            wt = torch.randn(n_out, k, generator=gen)
            w64 = wt.double()
        else:
            wt = random_qt(n_out, k, bits, group, sym, sdt, gen)
            w64 = wt.dequantize(torch.float64)
        bias = torch.randn(n_out, generator=gen)
        w = be.linear_weight("w", wt, bias)
        x = torch.randn(1, m, k, generator=gen) * torch.rand(1, m, k, generator=gen) * 3
        xs = [be.from_host(x)]
        if dot and bits == 4:  # also from x8 rows a norm wrote
            xs.append(be.rmsnorm(be.from_host(x), be.param("n", torch.ones(k)), 1e-6, False))
        for xin in xs:
            xh = be.to_host(xin)
            out = be.to_host(be.linear(xin, w))
            ref = reference(xh, w64, dot and bits in (2, 4, 8)) + bias.double()
            assert rel_err(out, ref) < RTOL, (bits, dot, m, n_out, k, group, sym, parts)
            assert torch.equal(out, be.to_host(be.linear(xin, w)))  # the combine's order is fixed
    assert {2, 3, 5} <= kparts_used(be)
    assert counters_zero(be)


def test_row_tail_and_fused_pieces(kp, gen, monkeypatch):
    """Rows with a tail shorter than a chunk (the last part takes it) and fused q/k/v written to three outputs."""
    be = kp
    qt = random_qt(29, 32 * 6 + 8, 4, 200, False, torch.float16, gen)
    x = torch.randn(2, 1, 200, generator=gen)
    out = be.to_host(be.linear(be.from_host(x), be.linear_weight("tail", qt)))
    assert rel_err(out, x.double() @ qt.dequantize(torch.float64).T) < RTOL
    monkeypatch.setattr(be, "matvec_int_dot", True)
    qts = [random_qt(n, 32 * 12, 4, 128, True, torch.float16, gen) for n in (40, 8, 8)]
    ws = [be.linear_weight(f"qkv{i}", q) for i, q in enumerate(qts)]
    x = torch.randn(1, 1, 32 * 12, generator=gen)
    outs = be.linears(be.from_host(x), ws)
    assert be._fused[tuple(id(w) for w in ws)][1] is not None
    for out, q in zip(outs, qts):
        assert rel_err(be.to_host(out), int8_chunks(x) @ q.dequantize(torch.float64).T) < RTOL
    assert counters_zero(be)


def test_long_rows_pieces_and_a_folded_grid(kp, gen, monkeypatch):
    """``matvec_kparts`` on rows that widen the workgroup, a weight in row pieces, and a grid folded into y
    (padding workgroups past the last row block must not count themselves)."""
    be = kp
    for key, value in (("matvec_int_dot", True), ("matvec_kparts_short", 1), ("matvec_kparts", 4),
                       ("matvec_wg_max", 2 * be.wg), ("matvec_long_rows", 8)):
        monkeypatch.setattr(be, key, value)
    k = 32 * 4 * be.wg + 96  # widens the workgroup to 2 * wg
    qt = random_qt(53, k, 4, 32, False, torch.float16, gen)
    x = torch.randn(1, 2, k, generator=gen)
    w = be.linear_weight("down", qt)
    out = be.to_host(be.linear(be.from_host(x), w))
    assert rel_err(out, int8_chunks(x) @ qt.dequantize(torch.float64).T) < RTOL
    assert (2 * be.wg, 8, 4) in {(s[0], s[1], s[KPARTS]) for n, s in be.dev.pipelines if n == "matvec_quant_idot"}
    monkeypatch.setattr(be.dev, "max_range", 16 * k // 2)  # 16 rows a piece
    w = be.linear_weight("down pieces", qt)
    monkeypatch.setattr(be.dev, "max_range", 1 << 30)
    assert len(w.pieces) == 4
    monkeypatch.setattr(vk_backend, "MAX_GROUPS", 3)  # 2 row blocks x 4 parts a piece: a 3 x 3 grid, 1 padding
    out = be.to_host(be.linear(be.from_host(x), w))
    assert rel_err(out, int8_chunks(x) @ qt.dequantize(torch.float64).T) < RTOL
    assert counters_zero(be)


def test_counters_grow_outside_recordings_only(kp, gen, monkeypatch):
    """The counters made with the backend cover any short grid; a larger need grows them eagerly, and inside a
    replayable recording (where zeroing new ones would need an upload) is refused by name."""
    be = kp
    qt = random_qt(90, 32 * 24, 4, 32, True, torch.float16, gen)  # 90 rows of 8 a workgroup: 12 row blocks
    w = be.linear_weight("grow", qt)
    x = torch.randn(1, 1, 32 * 24, generator=gen)
    xd = be.from_host(x)
    monkeypatch.setattr(be, "_counters", [be._zeroed(8, "small counters")])
    be.synchronize()
    be.dev.begin_recording()
    try:
        with pytest.raises(LlmoptError, match="K-part mat-vec over 12 row blocks while recording .* counters hold 8"):
            be.linear(xd, w)
    finally:
        be.dev.end_recording()
    out = be.to_host(be.linear(xd, w))
    assert len(be._counters) == 2 and be._counters[-1].nbytes == 4 * 16  # doubled
    assert rel_err(out, x.double() @ qt.dequantize(torch.float64).T) < RTOL
    assert counters_zero(be)


def test_parts_are_capped_and_checked(be, monkeypatch):
    monkeypatch.setattr(be, "matvec_kparts", 64)
    monkeypatch.setattr(be, "matvec_kparts_short", 64)
    assert be._matvec_kparts(32 * 24, 16, 10, widened=False) == 3  # half a chunk an invocation: 24 chunks, 16 lanes
    assert be._matvec_kparts(32 * 24, 16, vk_backend.MATVEC_SHORT_GROUPS, widened=False) == 1  # a wide grid
    assert be._matvec_kparts(32 * 600, 128, 10 ** 6, widened=True) == 9  # long rows: whatever the grid
    assert be._matvec_kparts(32 * 4, 16, 1, widened=False) == 1  # rows shorter than the workgroup's chunks
    monkeypatch.setattr(be, "matvec_kparts_short", 0)
    with pytest.raises(LlmoptError, match="matvec_kparts .* expected 1"):
        be._matvec_kparts(32 * 24, 16, 10, widened=False)


def test_gated_ignores_kparts(kp, gen, monkeypatch):
    be = kp
    for key in ("matvec_int_dot", "fuse_gated_act"):
        monkeypatch.setattr(be, key, True)
    gate, up = (random_qt(24, 32 * 10, 4, 32, True, torch.float16, gen) for _ in range(2))
    x = torch.randn(1, 1, 32 * 10, generator=gen)
    out = be.to_host(be.gated_linears(be.from_host(x), be.linear_weight("g", gate), be.linear_weight("u", up), "silu"))
    xq = int8_chunks(x)
    ref = torch.nn.functional.silu(xq @ gate.dequantize(torch.float64).T) * (xq @ up.dequantize(torch.float64).T)
    assert rel_err(out, ref) < RTOL
    assert any(n == "matvec_quant_idot" and s[GATED] and s[KPARTS] == 1 for n, s in be.dev.pipelines)


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_tiny_model_with_kparts_replayed(be, tmp_path, monkeypatch, family):
    """Whole int4 models decoding with K parts on every mat-vec (x8 rows, int-dot): logits near those of the same
    model without them (x8 rounding amplifies the summation order's last bits), replayed bit-identical to eager."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    folder = pack_folder(save_random(FAMILIES[family](hidden_size=1024, intermediate_size=1152), tmp_path / "f", seed),
                         tmp_path / "q",
                         [Spec(4, 32, sym=False)])
    model = load_model(folder, backend=be)
    ids = torch.randint(0, COMMON["vocab_size"], (1, 10))
    for key in ("matvec_int_dot", "matvec_x_q8"):
        monkeypatch.setattr(be, key, True)
    monkeypatch.setattr(be, "matvec_min_groups", 1)
    monkeypatch.setattr(be, "wg", 32)  # as test_vulkan_x8_gated: rows of 32 and 36 chunks take 2 parts at 32 lanes
    runs = {}
    for parts in (1, 2):
        monkeypatch.setattr(be, "matvec_kparts_short", parts)
        for replay in (False, True):
            model.static_decode = replay
            logits, state = model.prefill(ids[:, :4], max_len=ids.shape[1] + 1)
            steps = [model.decode_step(state, ids[:, t]) for t in range(4, ids.shape[1])]
            assert state.decode_path == ("replayed" if replay else "eager: Model.static_decode is off")
            runs[parts, replay] = torch.stack([logits, *steps])
    name = f"{family} seed={seed}"
    assert (32, 2) in {(s[0], s[KPARTS]) for n, s in be.dev.pipelines if n == "matvec_quant_idot"}
    assert torch.equal(runs[2, True], runs[2, False]), f"{name}: replayed K parts differ from eager"
    # a last-bit change of a sum can move an int8 code of the next layer's x: up to ~0.5% measured over 4 layers
    assert rel_err(runs[2, False], runs[1, False]) < 2e-2, name
    assert counters_zero(be)
