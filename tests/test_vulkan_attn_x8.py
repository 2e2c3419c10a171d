"""The fused decode attention writing its output as x8 rows for the o projection (``VulkanBackend.attn_x8``,
``shaders/rope_attention.glsl`` with Q8 = 1), on lavapipe with the GPU configuration forced on (int-dot mat-vecs,
``matvec_x_q8``).

Tolerances (fresh random inputs; head sizes multiples of 32, odd group sizes and batches, one split and many):
* the float output against the CPU reference's rope + attention: relative error below 1e-5 (as
  test_vulkan_rope_attention);
* its x8 rows against a torch re-quantization of that float output (``x8_reference``): codes within 1 (the device's
  127 / max|x| may be one ulp off), at most 1% off by one, scales within 1e-6 relative, each chunk's code sum equal
  to the sum of its codes;
* the int4 o projection reading those x8 rows against the same mat-vec quantizing the float output itself:
  identical, bit for bit; so are whole tiny Qwen2 / Gemma 2 models (int4, head_dim 32) with ``attn_x8`` on and
  off, eager and replayed.
"""

from __future__ import annotations

import pytest
import torch

from llmopt.backends.base import AttnSpec
from llmopt.engine import load_model
from llmopt.quant.quantizers import Spec

from vulkan_device import require_vulkan
vulkan = require_vulkan("integer_dot_product")
from test_vulkan_ops import random_qt  # noqa: E402
from test_vulkan_rope_attention import RTOL, rel_err, tables  # noqa: E402
from test_vulkan_x8_gated import read_x8, x8_reference  # noqa: E402
from tiny_models import COMMON, FAMILIES, pack_folder, save_random  # noqa: E402

pytestmark = pytest.mark.vulkan


@pytest.fixture
def fast(be, monkeypatch):
    """The GPU configuration: int-dot mat-vecs reading x8 rows, the attention writing them."""
    for key in ("matvec_int_dot", "matvec_x_q8", "attn_x8"):
        monkeypatch.setattr(be, key, True)
    return be


def check_x8_rows(be, out) -> None:
    rows, k = out.rows, out.features
    values, scales, sums = read_x8(be, out)
    want, want_scales = x8_reference(be.to_host(out).reshape(rows, k))
    diff = (values - want).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01
    assert rel_err(scales, want_scales) < 1e-6
    assert torch.equal(sums, values.sum(-1).to(torch.int32))


@pytest.mark.parametrize("spec, batch, pad, chunk_min, split_target, clock", [
    (AttnSpec(14, 2, 32, 32 ** -0.5), 1, None, 64, 1, False),                  # Qwen's group of 7, one split
    (AttnSpec(14, 2, 32, 32 ** -0.5), 2, None, 2, 64, False),                  # ... split ~6 ways, combined
    (AttnSpec(6, 2, 96, 0.1, softcap=20.0), 3, [0, 3, 7], 2, 64, False),       # 3 chunks a head, left padding
    (AttnSpec(4, 2, 64, 0.125, window=5), 2, None, 3, 64, False),              # a window over the splits
    (AttnSpec(16, 2, 128, 128 ** -0.5), 2, None, 64, 1, False),                # a group of 8: 32 chunks at once
    (AttnSpec(6, 2, 96, 0.1, softcap=20.0), 3, [0, 3, 7], 64, 1, False),       # one split, padding
    (AttnSpec(5, 1, 32, 32 ** -0.5), 2, None, 2, 64, True),                    # the phase-clock build
])
def test_decode_writes_x8_rows_the_o_projection_reads(fast, cpu, gen, monkeypatch, spec, batch, pad, chunk_min,
                                                      split_target, clock):
    be = fast
    if clock and not be.dev.features.get("shader_clock"):
        pytest.skip("the device lacks VK_KHR_shader_clock")
    for key, value in (("attn_chunk_min", chunk_min), ("attn_split_target", split_target), ("attn_clock", clock)):
        monkeypatch.setattr(be, key, value)
    prompt, decode, F = 9, 4, spec.n_heads * spec.head_dim
    max_len = prompt + decode + 1
    cv = be.kv_cache(1, batch, max_len, spec.n_kv_heads, spec.head_dim, [spec.window])
    cc = cpu.kv_cache(1, batch, max_len, spec.n_kv_heads, spec.head_dim, [spec.window])
    valid = torch.ones(batch, max_len, dtype=torch.bool)
    for b, p in enumerate(pad or []):
        valid[b, :p] = False
    qt = random_qt(37, F, 4, 32, False, torch.bfloat16, gen)  # o: odd rows, zero points
    wo = be.linear_weight("o", qt)
    start = 0
    for T in [prompt] + [1] * decode:
        q = torch.randn(batch, T, F, generator=gen) * 3
        k, v = (torch.randn(batch, T, spec.n_kv_heads * spec.head_dim, generator=gen) for _ in range(2))
        cos, sin = tables(batch, T, spec.head_dim, gen)
        mask = valid[:, :start + T] if pad else None
        out = be.rope_attention(be.from_host(q), be.from_host(k), be.from_host(v), cos, sin, spec.head_dim, cv, 0,
                                start, mask, spec)
        ref = cpu.attention(cpu.rope(q, cos, sin, spec.head_dim), cpu.rope(k, cos, sin, spec.head_dim), v, cc, 0,
                            start, mask, spec)
        host = be.to_host(out)
        assert rel_err(host, ref) < RTOL, (spec, T, start)
        case = (spec, batch, T, start, be._splits(spec, cv, batch))
        if T > 1:
            assert out.q8 is None, case  # prefill: rope, rope, attention; the tiled matmul reads float x
        else:
            assert out.q8 is not None, case
            check_x8_rows(be, out)
            assert torch.equal(be.to_host(be.linear(out, wo)), be.to_host(be.linear(be.from_host(host), wo))), case
        start += T


def test_x8_rows_only_where_the_o_projection_can_read_them(fast, gen, monkeypatch):
    be = fast

    def decode(spec: AttnSpec, batch: int = 1):
        cache = be.kv_cache(1, batch, 4, spec.n_kv_heads, spec.head_dim, [None])
        q = be.from_host(torch.randn(batch, 1, spec.n_heads * spec.head_dim, generator=gen))
        kv = be.from_host(torch.randn(batch, 1, spec.n_kv_heads * spec.head_dim, generator=gen))
        cos, sin = tables(batch, 1, spec.head_dim, gen)
        assert be._fusable(q, spec, cache)
        return be.rope_attention(q, kv, kv, cos, sin, spec.head_dim, cache, 0, 0, None, spec)

    spec = AttnSpec(4, 2, 32, 0.2)
    assert decode(spec).q8 is not None
    assert decode(AttnSpec(4, 2, 48, 0.2)).q8 is None  # a head of 48: chunks would straddle two heads
    assert decode(spec, batch=9).q8 is None  # more rows than the mat-vec takes: the matmul reads float x
    monkeypatch.setattr(be, "attn_x8", False)
    assert decode(spec).q8 is None
    monkeypatch.setattr(be, "attn_x8", True)
    monkeypatch.setattr(be, "matvec_x_q8", False)
    assert decode(spec).q8 is None
    monkeypatch.setattr(be, "matvec_x_q8", True)
    monkeypatch.setattr(be, "matvec_int_dot", False)
    assert decode(spec).q8 is None
    monkeypatch.setattr(be, "matvec_int_dot", True)
    # the staging array does not fit beside the attention's own shared arrays: still fused, float output only
    monkeypatch.setitem(be.probe["device"], "max_shared_memory_bytes", be._fused_shared_bytes(64 + 2) - 4)
    assert decode(spec).q8 is None


@pytest.mark.parametrize("chunk_min, split_target", [(2, 64), (64, 1)])
@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_tiny_model_attention_x8_changes_no_bit(be, tmp_path, monkeypatch, family, chunk_min, split_target):
    """Whole int4 models with head_dim 32 (the attention writes x8 rows), a batch of 2, many splits and one:
    attn_x8 on and off, eager and replayed, give the same logits bit for bit, and the rows were written."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    folder = pack_folder(save_random(FAMILIES[family](head_dim=32), tmp_path / "f", seed), tmp_path / "q",
                         [Spec(4, 32, sym=False)])
    model = load_model(folder, backend=be)
    for key, value in (("matvec_int_dot", True), ("matvec_x_q8", True), ("attn_chunk_min", chunk_min),
                       ("attn_split_target", split_target)):
        monkeypatch.setattr(be, key, value)
    written, attn_out = [], be._attn_out  # per fused dispatch: whether it wrote x8 rows

    def watched(q, spec):
        out, x8 = attn_out(q, spec)
        written.append(out.q8 is not None)
        return out, x8

    monkeypatch.setattr(be, "_attn_out", watched)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 11))
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(be, "attn_x8", on)
        for replay in (False, True):
            model.static_decode = replay
            written.clear()
            logits, state = model.prefill(ids[:, :4], max_len=ids.shape[1] + 1)
            steps = [model.decode_step(state, ids[:, t]) for t in range(4, ids.shape[1])]
            assert state.decode_path == ("replayed" if replay else "eager: Model.static_decode is off")
            assert written and all(w == on for w in written), (on, replay)
            runs[on, replay] = torch.stack([logits, *steps])
    name = f"{family} seed={seed}"
    for key, got in runs.items():
        assert torch.equal(got, runs[False, False]), f"{name}: attn_x8, replayed = {key} differs from off, eager"
