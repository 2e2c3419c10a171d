"""Float64 torch references for every NPU kernel, and random test cases built on them.

``case(spec, seed)`` returns ``(inputs, expected, tol)``: numpy inputs in the kernel's argument order, the
float64 reference outputs, and the absolute tolerance (scaled to the output's magnitude) a float32 kernel
must meet. The compile stage and tests/test_npu_*.py check every compiled kernel with it. The references are
written from the math (and the attention one is itself checked against ``llmopt.backends.cpu`` in the tests),
never from the kernels.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from llmopt.backends.npu.kernels import KernelSpec
from llmopt.quant.format import QuantizedTensor, pack_bits

F64 = torch.float64


def random_quantized(n: int, k: int, bits: int, group: int, sym: bool = True, scale: str = "float16",
                     gen: torch.Generator | None = None) -> QuantizedTensor:
    """A random weight in the packed format (codes uniform, scales ~1/sqrt(k), zeros near the middle)."""
    codes = torch.randint(0, 2 ** bits, (n, k), generator=gen, dtype=torch.int32).to(torch.uint8)
    dtype = torch.bfloat16 if scale == "bfloat16" else torch.float16
    scales = ((torch.rand(n, k // group, generator=gen) + 0.5) / math.sqrt(k)).to(dtype)
    zeros = None if sym else (torch.randint(0, 2 ** bits, (n, k // group), generator=gen).float()).to(dtype)
    return QuantizedTensor(pack_bits(codes, bits), scales, zeros, bits, group, (n, k))


def quant_args(qt: QuantizedTensor) -> list[np.ndarray]:
    """The kernel arguments of a packed weight: uint8 rows, scales (and zeros); bf16 as its raw uint16 bits."""
    def half(t):
        return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()

    args = [qt.qweight.numpy(), half(qt.scales)]
    if qt.zeros is not None:
        args.append(half(qt.zeros))
    return args


# --- references -----------------------------------------------------------------------------------

def attention(q, k, v, mask, scale, softcap=0.0):
    """q [B,HQ,T,D], k/v [B,HKV,S,D], mask bool [B,T,S] -> [B,HQ,T,D], float64."""
    r = q.shape[1] // k.shape[1]
    k, v = k.to(F64).repeat_interleave(r, 1), v.to(F64).repeat_interleave(r, 1)
    s = (q.to(F64) @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    return torch.softmax(s, -1) @ v


def rope(x, cos, sin):
    """Rotate-half RoPE: x [B,T,H,D], cos/sin [B,T,D]."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x.to(F64) * cos[:, :, None].to(F64) + rot.to(F64) * sin[:, :, None].to(F64)


def window_mask(kpos, qpos, window: int, valid) -> torch.Tensor:
    """bool [B,T,S]: key slot s (holding position kpos[s], -1 = empty) is visible to query position qpos[t]."""
    qp, kp = qpos[:, None], kpos[None, :]
    allowed = (kp <= qp) & (kp > qp - window) & (kp >= 0)
    return allowed[None] & (valid[:, None, :] | (kp == qp)[None])


def act(x, kind):
    if kind == "silu":
        return x * torch.sigmoid(x)
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


# --- cases ------------------------------------------------------------------------------------------

def case(spec: KernelSpec, seed: int = 0, rows: int | None = None):
    """Random inputs for ``spec``, the float64 reference outputs, and the tolerance."""
    g = torch.Generator().manual_seed(seed)
    p, vals = spec.p, spec.values()
    name = spec.kernel
    if name in ("qgemv", "qgemm"):
        m = rows or p.get("ROWS") or (3 if name == "qgemv" else 19)
        qt = random_quantized(vals["N"], vals["K"], vals["BITS"], vals["G"], not vals["ASYM"], p.get("SCALE", "float16"), g)
        x = torch.randn(m, vals["K"], generator=g)
        y = x.to(F64) @ qt.dequantize(F64).T
        inputs = [x.numpy(), *quant_args(qt)]
        if vals["BIAS"]:
            bias = torch.randn(vals["N"], generator=g)
            inputs.append(bias.numpy())
            y = y + bias.to(F64)
        return inputs, [y.numpy()], _tol(y)
    if name == "attention":
        b, t, s = 2, 3, 7
        q = torch.randn(b, vals["HQ"], t, vals["D"], generator=g)
        k = torch.randn(b, vals["HKV"], s, vals["D"], generator=g)
        v = torch.randn(b, vals["HKV"], s, vals["D"], generator=g)
        mask = torch.rand(b, t, s, generator=g) > 0.3
        mask[:, :, -1] = True  # every row sees at least one key
        y = attention(q, k, v, mask, float(p["SCALE"]), float(p.get("SOFTCAP") or 0))
        return [q.numpy(), k.numpy(), v.numpy(), mask.numpy().astype(np.int8)], [y.numpy()], _tol(y)
    if name == "sliding_window_attention":  # a ring of WINDOW slots (one empty) plus this step's keys
        b, t, w = 2, 3, vals["WINDOW"]
        start = 2 * w + 1
        kpos = torch.cat([torch.arange(start - w + 1, start), torch.tensor([-1]), torch.arange(start, start + t)])
        kpos = torch.cat([kpos[3:w], kpos[:3], kpos[w:]])  # ring order: slots hold positions out of order
        qpos = torch.arange(start, start + t)
        q = torch.randn(b, vals["HQ"], t, vals["D"], generator=g)
        k = torch.randn(b, vals["HKV"], len(kpos), vals["D"], generator=g)
        v = torch.randn(b, vals["HKV"], len(kpos), vals["D"], generator=g)
        valid = torch.ones(b, len(kpos), dtype=torch.bool)
        valid[1, kpos < start - 2] = False  # sequence 1 is left-padded
        mask = window_mask(kpos, qpos, w, valid)
        y = attention(q, k, v, mask, float(p["SCALE"]), float(p.get("SOFTCAP") or 0))
        inputs = [q.numpy(), k.numpy(), v.numpy(), kpos.numpy(), qpos.numpy(), valid.numpy().astype(np.int8)]
        return inputs, [y.numpy()], _tol(y)
    if name == "rope_attention":
        b, t, past = 2, 3, 5
        hq, hkv, d = vals["HQ"], vals["HKV"], vals["D"]
        q = torch.randn(b, t, hq, d, generator=g)
        k = torch.randn(b, t, hkv, d, generator=g)
        ang = torch.rand(b, t, d // 2, generator=g) * 6
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        kpast = torch.randn(b, hkv, past, d, generator=g)
        v = torch.randn(b, hkv, past + t, d, generator=g)
        qp = torch.arange(past, past + t)[:, None]
        mask = (torch.arange(past + t)[None, :] <= qp)[None].expand(b, t, past + t).clone()
        mask[1, :, :2] = False  # padding
        krot = rope(k, cos, sin)
        keys = torch.cat([kpast.to(F64), krot.transpose(1, 2)], 2)
        out = attention(rope(q, cos, sin).transpose(1, 2), keys, v, mask, float(p["SCALE"])).transpose(1, 2)
        inputs = [q.numpy(), k.numpy(), cos.numpy(), sin.numpy(), kpast.numpy(), v.numpy(), mask.numpy().astype(np.int8)]
        return inputs, [out.numpy(), krot.numpy()], max(_tol(out), _tol(krot))
    if name == "gated_ffn":
        m = rows or 2
        h, f, bits, grp = vals["H"], vals["F"], p["BITS"], p["G"]
        sym, scale = not p.get("ASYM", False), p.get("SCALE", "float16")
        wg, wu, wd = (random_quantized(n, k, bits, grp, sym, scale, g) for n, k in ((f, h), (f, h), (h, f)))
        x = torch.randn(m, h, generator=g)
        gate, up = x.to(F64) @ wg.dequantize(F64).T, x.to(F64) @ wu.dequantize(F64).T
        y = (act(gate, p.get("ACT", "silu")) * up) @ wd.dequantize(F64).T
        return [x.numpy(), *quant_args(wg), *quant_args(wu), *quant_args(wd)], [y.numpy()], _tol(y)
    if name == "vl_patch_merger":
        c, merge, dout = vals["C"], vals["MERGE"], vals["DOUT"]
        tokens = merge * 3
        x = torch.randn(tokens, c, generator=g)
        lnw = 1 + 0.1 * torch.randn(c, generator=g)
        w1, b1 = torch.randn(c * merge, c * merge, generator=g) / math.sqrt(c * merge), torch.randn(c * merge, generator=g)
        w2, b2 = torch.randn(dout, c * merge, generator=g) / math.sqrt(c * merge), torch.randn(dout, generator=g)
        hid = rmsnorm(x.to(F64), lnw.to(F64), float(p.get("EPS", 1e-6))).view(-1, c * merge) @ w1.to(F64).T + b1.to(F64)
        y = torch.nn.functional.gelu(hid) @ w2.to(F64).T + b2.to(F64)
        return [t.numpy() for t in (x, lnw, w1, b1, w2, b2)], [y.numpy()], _tol(y)
    raise ValueError(f"no reference case for kernel {name}")


def _tol(y: torch.Tensor) -> float:
    return 2e-5 * max(1.0, float(y.abs().max()))


def compare(got: list[np.ndarray], expected: list[np.ndarray], tol: float) -> dict:
    """Max absolute error of each output against the reference; ``ok`` when all are finite and within ``tol``."""
    errs = []
    for a, b in zip(got, expected):
        if a.shape != b.shape:
            return {"ok": False, "error": f"shape {a.shape} != reference {b.shape}", "max_abs_err": float("inf"), "tol": tol}
        errs.append(float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0)
    err = max(errs) if errs else 0.0
    return {"ok": bool(len(got) == len(expected) and np.isfinite(err) and err <= tol), "max_abs_err": err, "tol": tol}
