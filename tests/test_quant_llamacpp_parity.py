"""Our rtn int4 / int5 g32 sym is llama.cpp's Q4_0 / Q5_0, code for code, ties included; int8 g32 sym is Q8_0, code
for code (its own float32 arithmetic: codes from the unrounded scale; the stored fp16 one moved 0.5-3% of them);
the mse search and GPTQ at int4 g32 asym reproduce weights decoded from Q4_K (up to fp16 rounding).

Reference: the numpy Q4_0 quantizer of the `gguf` package (ggml's reference rules). The inputs lie on a
coarser quantization grid, as the pip Gemma 3 270M's float weights do (decoded from Q5_0): half of the values are
then exact rounding ties, which is where rounding rules differ (round half up, not half to even).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from llmopt.quant.quantizers import Spec, quantize


def grid_weights(rows: int, cols: int, levels: int, seed: int) -> torch.Tensor:
    """Weights ``k * 2**-8`` with integer ``k`` in ``[-levels, levels - 1]``, each block of 32 spanning it all."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randint(-levels, levels, (rows, cols), generator=gen)
    k.view(rows, -1, 32)[..., 0] = -levels  # the block's extreme: the scale is a power of two, exact in fp16
    return k.float() * 2.0**-8


@pytest.mark.parametrize("bits, kind", [(4, GGMLQuantizationType.Q4_0), (5, GGMLQuantizationType.Q5_0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rtn_g32_sym_is_llamacpp_q4_0_and_q5_0(seed, bits, kind):
    # a grid of twice the format's levels (for int4 a Q5_0-like grid): the scale is twice its step, so every odd
    # level is an exact tie
    w = grid_weights(64, 256, 2**bits, seed)
    ref = torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), kind), kind).copy())
    ours = quantize(w, Spec(bits, 32, True), "rtn").dequantize()
    ties = (w * 2**8).remainder(2) != 0
    assert 0.4 < ties.float().mean() < 0.6  # the case under test
    assert torch.equal(ours, ref)
    # torch.round (half to even) would differ on about half of the ties
    step = 2.0**-7
    half_even = (w / step).round() * step
    assert not torch.equal(half_even[ties], ref[ties])


def test_rtn_int5_reproduces_weights_on_the_q5_0_grid():
    """Weights that are Q5_0 values (as the pip Gemma 3 270M's are) come back exactly from int5 g32 sym."""
    w = grid_weights(32, 256, 16, 4)  # 32 levels with the block's extreme at -16 steps: a Q5_0 block exactly
    assert torch.equal(quantize(w, Spec(5, 32, True), "rtn").dequantize(), w)


def test_rtn_on_generic_weights_matches_llamacpp_up_to_scale_rounding():
    # fp16 rounding of the scale: llama.cpp divides by the unrounded scale, we by the stored one (exact decode)
    w = torch.randn(32, 512, generator=torch.Generator().manual_seed(3)) * 0.02
    ref = quants.dequantize(quants.quantize(w.numpy(), GGMLQuantizationType.Q4_0), GGMLQuantizationType.Q4_0)
    ours = quantize(w, Spec(4, 32, True), "rtn").dequantize().numpy()
    assert np.mean(ours != ref) < 0.01
    assert np.linalg.norm(ours - w.numpy()) <= np.linalg.norm(ref - w.numpy()) * 1.001


def test_rtn_int8_reproduces_q8_0_tensors():
    """Weights decoded from Q8_0 (the pip Gemma 3 270M's embedding table is) come back exactly from int8 g32 sym;
    on random weights the codes are gguf's Q8_0 codes (dividing by the stored fp16 scale moved 0.5-3% of them)."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    w = torch.randn(64, 256, generator=gen) * 0.03
    q8 = torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), GGMLQuantizationType.Q8_0),
                                            GGMLQuantizationType.Q8_0).copy())
    assert torch.equal(quantize(q8, Spec(8, 32, True), "rtn").dequantize(), q8)
    assert torch.equal(quantize(w, Spec(8, 32, True), "rtn").dequantize(), q8)


def q4_k_weights(rows: int, blocks: int, seed: int) -> torch.Tensor:
    """Weights decoded by gguf's reference Q4_K dequantizer from random blocks (sane fp16 super-scales): per 32
    values ``d * sc * q - dmin * m`` with 6-bit ``sc``, ``m`` and 4-bit codes, about a quarter of the groups not
    using code 0 or 15, as in the pip Gemma 3 270M's attn_output / ffn_down tensors."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, blocks, 144), dtype=np.uint8)
    for offset, base in ((0, 0.002), (2, 0.003)):  # d, dmin
        half = (base * rng.uniform(0.5, 2.0, (rows, blocks))).astype(np.float16)
        raw[..., offset:offset + 2] = half.view(np.uint8).reshape(rows, blocks, 2)
    return torch.from_numpy(quants.dequantize(raw.reshape(rows, -1), GGMLQuantizationType.Q4_K).copy())


@pytest.mark.parametrize("seed", [0, 1])
def test_int4_g32_asym_search_and_gptq_reproduce_q4_k_tensors(seed):
    w = q4_k_weights(32, 4, seed)
    spec = Spec(4, 32, False)
    x = torch.randn(256, w.shape[1], generator=torch.Generator().manual_seed(seed))
    errors = {method: float((quantize(w, spec, method, hessian=x.T @ x).dequantize() - w).norm() / w.norm())
              for method in ("rtn", "mse", "gptq")}
    # the range rule misses every group whose codes do not reach 0 and 15; scanning the span finds its lattice
    assert errors["rtn"] > 0.005
    assert errors["mse"] < 5e-4 and errors["gptq"] < 5e-4
