"""CpuBackend: fast quantized paths vs ``QuantizedTensor.dequantize()`` (float64 reference), fresh random inputs.

Tolerances (relative to the largest |reference| output):
- int4 via ``_weight_int4pack_mm_for_cpu`` and int8 via ``_weight_int8pack_mm`` with ``kernel_dtype=float32``: 1e-5;
- the same kernels with the default bfloat16 kernel input (activations and scales rounded to bf16): 1e-2;
- dequantized-to-bfloat16 fallbacks (2/3-bit, group-wise 8-bit, N not a multiple of 16): 1e-2 (bf16 rounding);
- ``quant="reference"``: 1e-6 (plain float32).
"""

from __future__ import annotations

import pytest
import torch

from llmopt.backends import get_backend, probe
from llmopt.backends.base import AttnSpec
from llmopt.quant.format import QuantizedTensor, pack_bits, save_packed


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Random weights would fill the user's repack cache: give each test its own."""
    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "cache"))


def random_qt(out, n_in, bits, group, sym, scale_dtype=torch.float16, gen=None):
    codes = torch.randint(0, 2**bits, (out, n_in), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(out, n_in // group, generator=gen) * 0.02 + 0.001).to(scale_dtype)
    zeros = None if sym else (torch.rand(out, n_in // group, generator=gen) * (2**bits - 1)).to(scale_dtype)
    return QuantizedTensor(pack_bits(codes, bits), scales, zeros, bits, group, (out, n_in))


def check_linear(backend, qt, bias, tol, expect_kind=None):
    w = backend.linear_weight("w", qt, bias)
    if expect_kind:
        assert w.kind == expect_kind
    x = torch.randn(3, 5, qt.shape[1])
    y = backend.linear(backend.from_host(x), w)
    ref = x.double() @ qt.dequantize(torch.float64).T + (0 if bias is None else bias.double())
    err = (backend.to_host(y).double() - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item(), f"{qt.bits}-bit g{qt.group} sym={qt.sym} {w.kind}: {err:.3e}"


@pytest.mark.parametrize("group", [32, 64, 128, 256, 640])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_int4pack_matches_dequantize(group, sym, scale_dtype):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**30, ())))
    qt = random_qt(48, 1280 if group == 256 else 640, 4, group, sym, scale_dtype, gen)
    check_linear(get_backend("cpu", kernel_dtype="float32"), qt, torch.randn(48), 1e-5, "int4pack")
    check_linear(get_backend("cpu"), qt, torch.randn(48), 1e-2, "int4pack")


def test_int4_rows_not_multiple_of_16_fall_back():
    check_linear(get_backend("cpu"), random_qt(40, 128, 4, 32, True), None, 1e-2, "dense-bfloat16")


def test_int8_per_channel_uses_int8pack():
    qt = random_qt(64, 256, 8, 256, True)
    check_linear(get_backend("cpu", kernel_dtype="float32"), qt, torch.randn(64), 1e-5, "int8pack")
    check_linear(get_backend("cpu"), qt, torch.randn(64), 1e-2, "int8pack")


@pytest.mark.parametrize("bits,group,sym", [(8, 64, False), (3, 32, True), (2, 64, False), (3, 128, False),
                                            (5, 32, True), (6, 64, False)])
def test_lowbit_dense_fallback(bits, group, sym):
    check_linear(get_backend("cpu"), random_qt(32, 256, bits, group, sym), None, 1e-2, "dense-bfloat16")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_reference_mode_is_float32_dequantize(bits):
    check_linear(get_backend("cpu", quant="reference"), random_qt(32, 128, bits, 32, False), torch.randn(32), 1e-6, "dense")


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_embedding_gathers_dequantized_rows(bits):
    be = get_backend("cpu")
    qt = random_qt(100, 64, bits, 32, bits == 4)
    table = be.embedding_table("emb", qt)
    ids = torch.randint(0, 100, (2, 7))
    got = be.to_host(be.embedding(ids, table, scale=3.0))
    assert torch.equal(got, qt.dequantize()[ids] * 3.0)


def test_sliding_window_ring_cache_matches_dense_mask():
    """Prefill + decode through a ring cache of `window` slots equals masked attention over the full sequence."""
    be = get_backend("cpu")
    B, T, H, KV, D, W = 2, 15, 4, 2, 8, 5
    spec = AttnSpec(H, KV, D, D ** -0.5, window=W, softcap=None)
    q, k, v = (torch.randn(B, T, n * D) for n in (H, KV, KV))
    cache = be.kv_cache(1, B, T, KV, D, [W])
    assert cache.k[0].shape[2] == W  # the cache keeps only the window
    out = [be.attention(q[:, :7], k[:, :7], v[:, :7], cache, 0, 0, None, spec)]
    for t in range(7, T):
        out.append(be.attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache, 0, t, None, spec))
    out = torch.cat(out, dim=1)
    qh = q.view(B, T, H, D).transpose(1, 2).double()
    kh = k.view(B, T, KV, D).transpose(1, 2).repeat_interleave(H // KV, 1).double()
    vh = v.view(B, T, KV, D).transpose(1, 2).repeat_interleave(H // KV, 1).double()
    i = torch.arange(T)
    allowed = (i[None] <= i[:, None]) & (i[None] > i[:, None] - W)
    scores = (qh @ kh.transpose(-1, -2) * D ** -0.5).masked_fill(~allowed, float("-inf"))
    ref = (torch.softmax(scores, -1) @ vh).transpose(1, 2).reshape(B, T, H * D)
    assert (out.double() - ref).abs().max() < 1e-5


def test_softcap_attention_matches_formula():
    be = get_backend("cpu")
    B, T, H, D, cap = 1, 6, 2, 8, 2.0
    spec = AttnSpec(H, H, D, 0.5, None, cap)
    q, k, v = (torch.randn(B, T, H * D) * 3 for _ in range(3))
    out = be.attention(q, k, v, be.kv_cache(1, B, T, H, D, [None]), 0, 0, None, spec)
    qh, kh, vh = (t.view(B, T, H, D).transpose(1, 2).double() for t in (q, k, v))
    s = cap * torch.tanh(qh @ kh.transpose(-1, -2) * 0.5 / cap)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    ref = (torch.softmax(s, -1) @ vh).transpose(1, 2).reshape(B, T, H * D)
    assert (out.double() - ref).abs().max() < 1e-5


def test_probe_reports_present():
    rec = probe("cpu")
    assert rec["present"] is True and rec["device"]["cores"] >= 1 and "int4pack_mm" in rec["features"]


def test_cuda_probe_absent_here_with_reason():
    rec = probe("cuda")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert rec["present"] is False and "CUDA" in rec["reason"]


def test_quantized_tiny_model_fast_vs_reference(tmp_path):
    """A whole int4-g32 (asym) Gemma 3 model: fast path logits equal the reference (dequantized float32) path
    (1e-4 relative with float32 kernel input, 2e-2 with the default bfloat16 kernel input)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from llmopt.engine import load_model
    from llmopt.quant.quantizers import Spec, quantize

    cfg = Gemma3TextConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4)
    hf = Gemma3ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    tensors = {}
    for name, t in hf.state_dict().items():
        if t.dim() == 2 and "embed" not in name:
            tensors[name] = quantize(t.float(), Spec(4, 32, sym=False), "rtn", name=name)
        else:
            tensors[name] = t
    save_packed(tmp_path / "model.safetensors", tensors)
    ids = torch.randint(0, 320, (2, 9))
    exact = load_model(tmp_path, backend=get_backend("cpu", kernel_dtype="float32"))
    fast = load_model(tmp_path, backend=get_backend("cpu"))
    ref = load_model(tmp_path, backend=get_backend("cpu", quant="reference"))
    assert fast.backends["cpu"].kinds.get("int4pack", 0) == 14  # 7 linears x 2 layers
    b = ref.forward_logits(ids)
    assert (exact.forward_logits(ids) - b).abs().max() <= 1e-4 * b.abs().max()
    assert (fast.forward_logits(ids) - b).abs().max() <= 2e-2 * b.abs().max()


def test_int4_repack_cache_roundtrip(tmp_path):
    """The second upload of the same packed weight reads the cached tiling and computes the same result."""
    qt = random_qt(64, 256, 4, 64, False)
    first = get_backend("cpu", repack_cache=tmp_path)
    w1 = first.linear_weight("w", qt)
    assert first.repack_cache_hits == 0 and len(list(tmp_path.glob("int4pack-*.safetensors"))) == 1
    second = get_backend("cpu", repack_cache=tmp_path)
    w2 = second.linear_weight("w", qt)
    assert second.repack_cache_hits == 1 and torch.equal(w1.weight, w2.weight)
    x = torch.randn(2, 256)
    assert torch.equal(second.linear(x, w2), first.linear(x, w1))
