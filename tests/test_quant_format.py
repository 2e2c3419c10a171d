"""Packed format round trips: every bits x group x sym x scale dtype, on non-trivial shapes, through files."""

from __future__ import annotations

import itertools

import pytest
import torch

from llmopt.errors import LlmoptError
from llmopt.quant.format import load_packed, pack_bits, save_packed, unpack_bits
from llmopt.quant.quantizers import Spec, quantize

SHAPES = [(24, 384), (7, 256)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_unpack_roundtrip(bits):
    gen = torch.Generator().manual_seed(bits)
    for out, n_in in [(5, 32), (33, 96), (64, 640)]:
        codes = torch.randint(0, 2**bits, (out, n_in), generator=gen, dtype=torch.uint8)
        packed = pack_bits(codes, bits)
        assert packed.shape == (out, n_in * bits // 8)
        assert torch.equal(unpack_bits(packed, bits, n_in), codes)


def test_pack_bit_order_is_lsb_first():
    codes = torch.tensor([[1, 2, 3, 0, 7, 5, 6, 4] * 4], dtype=torch.uint8)
    p4 = pack_bits(codes[:, :8] & 15, 4)
    assert p4[0, 0].item() == 0x21 and p4[0, 1].item() == 0x03
    p3 = pack_bits(codes, 3)  # elements 0..7 = 1,2,3,0,7,5,6,4 -> bits LSB first
    stream = sum(int(v) << (3 * j) for j, v in enumerate(codes[0, :8].tolist()))
    assert [p3[0, k].item() for k in range(3)] == [(stream >> (8 * k)) & 0xFF for k in range(3)]


@pytest.mark.parametrize("bits,group,sym,scale_dtype", [
    (b, g, s, d) for b, g, s, d in itertools.product([2, 3, 4, 5, 6, 8], [32, 64, 128, 0], [True, False], ["float16", "bfloat16"])
])
def test_quantize_save_load_dequantize(tmp_path, bits, group, sym, scale_dtype):
    gen = torch.Generator().manual_seed(bits * 1000 + group)
    for shape in SHAPES:
        w = torch.randn(shape, generator=gen) * 0.05 + 0.01
        qt = quantize(w, Spec(bits, group, sym, scale_dtype), "rtn")
        g = shape[1] if group == 0 else group
        assert qt.qweight.shape == (shape[0], shape[1] * bits // 8) and qt.scales.shape == (shape[0], shape[1] // g)
        assert (qt.zeros is None) == sym and str(qt.scales.dtype) == f"torch.{scale_dtype}"
        save_packed(tmp_path / "t.safetensors", {"w": qt, "norm": torch.ones(3)})
        back = load_packed(tmp_path / "t.safetensors")
        assert torch.equal(back["w"].qweight, qt.qweight) and torch.equal(back["norm"], torch.ones(3))
        deq = back["w"].dequantize()
        # The decoded weight equals the format's formula applied to stored codes, scales and zeros.
        q = back["w"].unpacked().float().view(shape[0], -1, g)
        z = 2 ** (bits - 1) if sym else back["w"].zeros.float().unsqueeze(-1)
        assert torch.allclose(deq, ((q - z) * back["w"].scales.float().unsqueeze(-1)).view(shape))
        # RTN error bound: half a step (asym) or one step (sym: the far end of the range is clamped), plus the
        # rounding of the stored scale and zero point (relative eps of the scale dtype times the largest code).
        wg = w.view(shape[0], -1, g)
        if sym:
            step = wg.abs().amax(-1) / 2 ** (bits - 1)
        else:
            step = (wg.amax(-1).clamp_min(0) - wg.amin(-1).clamp_max(0)) / (2**bits - 1)
        eps = 2.0**-11 if scale_dtype == "float16" else 2.0**-8
        bound = step * ((1.0 if sym else 0.5) + 2 * 2**bits * eps) + 1e-7
        assert bool(((deq - w).abs().view(shape[0], -1, g).amax(-1) <= bound).all())


def test_layout_errors():
    with pytest.raises(LlmoptError, match="not divisible by group size 128"):
        quantize(torch.randn(4, 192), Spec(4, 128), "rtn", name="x.weight")
    with pytest.raises(LlmoptError, match="bits=7"):
        quantize(torch.randn(4, 128), Spec(7, 32), "rtn")
    with pytest.raises(LlmoptError, match="unknown quantization method"):
        quantize(torch.randn(4, 128), Spec(4, 32), "awq")


def test_corrupt_packed_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LlmoptError, match="bad.safetensors"):
        load_packed(path)
