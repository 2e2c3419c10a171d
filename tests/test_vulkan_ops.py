"""Every Vulkan shader against a float64/float32 torch reference on fresh random inputs (lavapipe in CI).

Sizes are deliberately not multiples of the workgroup, row or tile sizes. Tolerance: relative error
||out - ref|| / ||ref|| below 2e-5 (float32 accumulation over at most a few hundred terms), unless stated.
"""

from __future__ import annotations

import pytest
import torch

from llmopt.backends.base import AttnSpec
from llmopt.errors import LlmoptError
from llmopt.quant.format import QuantizedTensor, pack_bits

from vulkan_device import require_vulkan
vulkan = require_vulkan()
pytestmark = pytest.mark.vulkan

RTOL = 2e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def random_qt(n_out, k, bits, group, sym, scale_dtype, gen) -> QuantizedTensor:
    codes = torch.randint(0, 2**bits, (n_out, k), generator=gen, dtype=torch.int32).to(torch.uint8)
    scales = (torch.rand(n_out, k // group, generator=gen) * 0.02 + 0.005).to(scale_dtype)
    zeros = None if sym else torch.randint(0, 2**bits, (n_out, k // group), generator=gen).to(scale_dtype)
    return QuantizedTensor(pack_bits(codes, bits), scales, zeros, bits, group, (n_out, k))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 19])  # decode (matvec, one and several rows) and prefill (tiled matmul)
def test_quantized_linear(be, gen, bits, m):
    for n_out, k, group, sym, sdt in [(37, 96, 32, True, torch.float16), (45, 128, 64, False, torch.bfloat16),
                                      (20, 160, 160, True, torch.bfloat16)]:
        qt = random_qt(n_out, k, bits, group, sym, sdt, gen)
        bias = torch.randn(n_out, generator=gen)
        x = torch.randn(1, m, k, generator=gen)
        w = be.linear_weight("w", qt, bias)
        out = be.to_host(be.linear(be.from_host(x), w))
        ref = x.double() @ qt.dequantize(torch.float64).T + bias.double()
        assert out.shape == (1, m, n_out)
        assert rel_err(out, ref) < RTOL, (bits, m, n_out, k, group, sym)


@pytest.mark.parametrize("k", [40, 72])  # rows that are not whole 32-code chunks: the tail path
def test_quantized_linear_row_tail(be, gen, k):
    for bits in (4, 8):
        qt = random_qt(29, k, bits, k, False, torch.float16, gen)
        for m in (1, 11):
            x = torch.randn(m, 1, k, generator=gen)
            out = be.to_host(be.linear(be.from_host(x), be.linear_weight("w", qt)))
            assert rel_err(out, x.double() @ qt.dequantize(torch.float64).T) < RTOL


@pytest.mark.parametrize("m", [1, 2, 21])
def test_float_linear(be, gen, m):
    w = torch.randn(53, 77, generator=gen)
    b = torch.randn(53, generator=gen)
    x = torch.randn(m, 1, 77, generator=gen)
    out = be.to_host(be.linear(be.from_host(x), be.linear_weight("f", w, b)))
    assert rel_err(out, x.double() @ w.double().T + b.double()) < RTOL


def test_weights_split_beyond_storage_buffer_range(be, gen, monkeypatch):
    """A weight larger than maxStorageBufferRange is bound in row pieces (forced here with a 1 KiB range)."""
    monkeypatch.setattr(be.dev, "max_range", 1024)
    qt = random_qt(70, 256, 4, 32, True, torch.float16, gen)  # 128 B a row: 8 rows a piece
    w = be.linear_weight("big", qt)
    assert len(w.pieces) == 9
    table = torch.randn(50, 24, generator=gen)  # 96 B a row: 10 rows a piece
    t = be.embedding_table("emb", table)
    assert len(t.pieces) == 5
    monkeypatch.undo()
    for m in (1, 17):
        x = torch.randn(1, m, 256, generator=gen)
        out = be.to_host(be.linear(be.from_host(x), w))
        assert rel_err(out, x.double() @ qt.dequantize(torch.float64).T) < RTOL
    ids = torch.randint(0, 50, (2, 9), generator=gen)
    assert torch.equal(be.to_host(be.embedding(ids, t)), table[ids])


def test_embedding(be, gen):
    table = torch.randn(301, 48, generator=gen)
    ids = torch.randint(0, 301, (3, 7), generator=gen)
    out = be.to_host(be.embedding(ids, be.embedding_table("e", table), scale=1.5))
    assert torch.allclose(out, table[ids] * 1.5, rtol=1e-6, atol=0)
    for bits in (3, 4, 8):
        qt = random_qt(97, 64, bits, 32, bits != 4, torch.bfloat16, gen)
        ids = torch.randint(0, 97, (2, 5), generator=gen)
        out = be.to_host(be.embedding(ids, be.embedding_table("q", qt), scale=2.0))
        assert rel_err(out, qt.dequantize(torch.float64)[ids] * 2.0) < 1e-6


def test_embedding_rejects_bad_ids(be, gen):
    t = be.embedding_table("e", torch.randn(10, 8, generator=gen))
    with pytest.raises(vulkan.backend.LlmoptError, match="token ids must lie in 0..9"):
        be.embedding(torch.tensor([[3, 10]]), t)


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rmsnorm(be, gen, unit_offset):
    x = torch.randn(2, 5, 70, generator=gen)
    w = torch.randn(70, generator=gen)
    out = be.to_host(be.rmsnorm(be.from_host(x), be.param("n", w), 1e-6, unit_offset))
    xd = x.double()
    ref = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * ((1.0 if unit_offset else 0.0) + w.double())
    assert rel_err(out, ref) < RTOL
    # per-head QK-norm: groups of head_dim features share one weight vector
    wq = torch.randn(14, generator=gen)
    out = be.to_host(be.rmsnorm(be.from_host(x), be.param("qn", wq), 1e-6, unit_offset, group=14))
    xg = xd.view(2, 5, 5, 14)
    ref = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + 1e-6) * ((1.0 if unit_offset else 0.0) + wq.double())).view(2, 5, 70)
    assert rel_err(out, ref) < RTOL


@pytest.mark.parametrize("unit_offset", [False, True])
def test_add_rmsnorm(be, gen, unit_offset):
    """The fused residual add + RMSNorm gives the sum and the norm of the sum."""
    a, b = torch.randn(3, 2, 83, generator=gen) * 2, torch.randn(3, 2, 83, generator=gen)
    w = torch.randn(83, generator=gen)
    total, out = be.add_rmsnorm(be.from_host(a), be.from_host(b), be.param("n", w), 1e-6, unit_offset)
    s = a.double() + b.double()
    ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * ((1.0 if unit_offset else 0.0) + w.double())
    assert torch.equal(be.to_host(total), a + b)
    assert rel_err(be.to_host(out), ref) < RTOL
    with pytest.raises(LlmoptError, match=r"add_rmsnorm: shapes \[3, 2, 83\] and \[1, 2, 83\] differ"):
        be.add_rmsnorm(be.from_host(a), be.from_host(b[:1]), be.param("n", w), 1e-6, unit_offset)


def test_layernorm(be, gen):
    x = torch.randn(3, 11, 83, generator=gen) * 3 + 1
    w, b = torch.randn(83, generator=gen), torch.randn(83, generator=gen)
    out = be.to_host(be.layernorm(be.from_host(x), be.param("w", w), be.param("b", b), 1e-5))
    ref = torch.nn.functional.layer_norm(x.double(), (83,), w.double(), b.double(), 1e-5)
    assert rel_err(out, ref) < RTOL


def test_add_and_activations(be, gen, cpu):
    a, b = torch.randn(2, 3, 101, generator=gen) * 4, torch.randn(2, 3, 101, generator=gen)
    va, vb = be.from_host(a), be.from_host(b)
    assert torch.equal(be.to_host(be.add(va, vb)), a + b)
    for kind in ("silu", "gelu_tanh", "gelu", "quick_gelu"):
        assert rel_err(be.to_host(be.act(va, kind)), cpu.act(a.double(), kind)) < 1e-6, kind
        assert rel_err(be.to_host(be.gated_act(va, vb, kind)), cpu.act(a.double(), kind) * b.double()) < 1e-6, kind
    with pytest.raises(vulkan.backend.LlmoptError, match="activation 'relu'"):
        be.act(va, "relu")


def test_rope(be, gen, cpu):
    for head_dim, heads in ((16, 3), (80, 2)):  # 80: the Qwen2.5-VL vision head size
        x = torch.randn(2, 6, heads * head_dim, generator=gen)
        ang = torch.rand(2, 6, head_dim // 2, generator=gen) * 20
        ang = torch.cat([ang, ang], -1)  # any table works; M-RoPE only changes how it is built
        cos, sin = ang.cos(), ang.sin()
        out = be.to_host(be.rope(be.from_host(x), cos, sin, head_dim))
        assert rel_err(out, cpu.rope(x.double(), cos.double(), sin.double(), head_dim)) < RTOL


def _attn_case(be, cpu, gen, spec: AttnSpec, steps: list[int], batch: int, pad: list[int] | None):
    """Prefill then decode through both backends' KV caches; compare every step's attention output."""
    max_len = sum(steps) + 3
    windows = [spec.window]
    cv, cc = be.kv_cache(1, batch, max_len, spec.n_kv_heads, spec.head_dim, windows), \
        cpu.kv_cache(1, batch, max_len, spec.n_kv_heads, spec.head_dim, windows)
    valid = torch.ones(batch, max_len, dtype=torch.bool)
    for b, p in enumerate(pad or []):
        valid[b, :p] = False
    start = 0
    for T in steps:
        q = torch.randn(batch, T, spec.n_heads * spec.head_dim, generator=gen)
        k = torch.randn(batch, T, spec.n_kv_heads * spec.head_dim, generator=gen)
        v = torch.randn(batch, T, spec.n_kv_heads * spec.head_dim, generator=gen)
        vmask = valid if pad else None
        out = be.to_host(be.attention(be.from_host(q), be.from_host(k), be.from_host(v), cv, 0, start, vmask, spec))
        ref = cpu.attention(q, k, v, cc, 0, start, vmask, spec)
        assert rel_err(out, ref) < 1e-5, (spec, T, start)
        start += T


@pytest.mark.parametrize("spec", [
    AttnSpec(4, 4, 16, 0.25),                                  # plain multi-head
    AttnSpec(6, 2, 24, 24 ** -0.5),                            # GQA (Qwen)
    AttnSpec(4, 2, 32, 0.1, window=5, softcap=50.0),           # Gemma 2: sliding window and softcap
    AttnSpec(2, 1, 256, 256 ** -0.5, window=4),                # Gemma 3 head size, window shorter than a step
])
def test_attention_prefill_then_decode(be, cpu, gen, spec):
    _attn_case(be, cpu, gen, spec, steps=[7, 1, 1, 3, 1], batch=2, pad=None)


def test_attention_left_padding(be, cpu, gen):
    _attn_case(be, cpu, gen, AttnSpec(4, 2, 16, 0.25), steps=[6, 1, 1], batch=3, pad=[0, 2, 5])
    _attn_case(be, cpu, gen, AttnSpec(4, 2, 16, 0.25, window=3, softcap=20.0), steps=[6, 1, 1], batch=2, pad=[4, 0])


def test_attention_full_segments(be, cpu, gen):
    spec = AttnSpec(4, 4, 20, 20 ** -0.5)
    T = 23
    q, k, v = (torch.randn(1, T, 80, generator=gen) for _ in range(3))
    segments = [(0, 9), (9, 10), (10, 23)]
    out = be.to_host(be.attention_full(be.from_host(q), be.from_host(k), be.from_host(v), segments, spec))
    assert rel_err(out, cpu.attention_full(q, k, v, segments, spec)) < 1e-5
    with pytest.raises(vulkan.backend.LlmoptError, match="cover 9 of 23"):
        be.attention_full(be.from_host(q), be.from_host(k), be.from_host(v), [(0, 9)], spec)


def test_attention_rejects_overflowing_cache(be, gen):
    spec = AttnSpec(2, 2, 8, 0.3)
    cache = be.kv_cache(1, 1, 4, 2, 8, [None])
    x = be.from_host(torch.randn(1, 3, 16, generator=gen))
    with pytest.raises(vulkan.backend.LlmoptError, match="exceed the KV cache of 4"):
        be.attention(x, x, x, cache, 0, 2, None, spec)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_logits_and_argmax(be, gen, softcap):
    head = torch.randn(1003, 64, generator=gen)
    x = torch.randn(2, 4, 64, generator=gen)
    w = be.linear_weight("head", head)
    xa = be.from_host(x)
    out = be.logits(xa, w, softcap)
    ref = x[:, -1].double() @ head.double().T
    if softcap:
        ref = softcap * torch.tanh(ref / softcap)
    assert out.shape == (2, 1003) and rel_err(out, ref) < RTOL
    assert torch.equal(be.argmax(be.logits_device(xa, w, softcap)), out.argmax(-1))


@pytest.mark.parametrize("wg,rows,wg_reduce,split", [(64, 4, 256, 0), (32, 16, 64, 8), (64, 2, 64, 32)])
def test_gpu_specializations(be, cpu, gen, monkeypatch, wg, rows, wg_reduce, split):
    """The workgroup/row sizes chosen for GPUs compute the same results (run here on lavapipe)."""
    monkeypatch.setattr(be, "wg", wg)
    monkeypatch.setattr(be, "rows_per_wg", rows)
    monkeypatch.setattr(be, "wg_reduce", wg_reduce)
    monkeypatch.setattr(be, "matvec_split", split)
    for n_out, k, bits, group in [(75, 256, 4, 128), (33, 296, 4, 296), (21, 224, 8, 32), (19, 160, 2, 32), (17, 96, 3, 32)]:
        qt = random_qt(n_out, k, bits, group, False, torch.float16, gen)  # k: a row tail; n_out: partial row sets
        for m in (1, 3):
            x = torch.randn(1, m, k, generator=gen)
            out = be.to_host(be.linear(be.from_host(x), be.linear_weight("w", qt)))
            assert rel_err(out, x.double() @ qt.dequantize(torch.float64).T) < RTOL, (n_out, k, bits, m)
    test_rmsnorm(be, gen, True)
    test_add_rmsnorm(be, gen, True)
    for spec in (AttnSpec(6, 2, 16, 0.25, window=4, softcap=30.0), AttnSpec(2, 1, 80, 0.1), AttnSpec(2, 2, 256, 0.06)):
        _attn_case(be, cpu, gen, spec, steps=[5, 1, 1], batch=2, pad=[0, 2])
    logits = torch.randn(3, 777, generator=gen)
    assert torch.equal(be.argmax(be.from_host(logits)), logits.argmax(-1))


@pytest.mark.parametrize("attr,value,message", [("matvec_split", 24, "power of two"), ("matvec_split", 64, "power of two"),
                                                  ("rows_per_wg", 4096, "shared memory")])
def test_matvec_bad_specialization(be, gen, monkeypatch, attr, value, message):
    """Sizes the mat-vec shader cannot run (a set size not dividing wg = 16, too much shared memory) are refused."""
    monkeypatch.setattr(be, "wg", 16)
    monkeypatch.setattr(be, attr, value)
    w = be.linear_weight("w", random_qt(8, 64, 4, 32, True, torch.float16, gen))
    with pytest.raises(LlmoptError, match=message):
        be.linear(be.from_host(torch.randn(1, 1, 64, generator=gen)), w)


def test_copy_shader(be, gen):
    data = torch.randint(-2**31, 2**31 - 1, (4096 + 12,), generator=gen, dtype=torch.int32)
    src = be.from_host(data.view(torch.float32).view(1, 1, -1))
    dst = be._new(src.shape)
    be.copy(src.buf, dst.buf, data.numel() * 4)
    assert torch.equal(be.to_host(dst).view(-1).view(torch.int32), data)
