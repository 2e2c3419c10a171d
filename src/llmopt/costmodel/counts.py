"""FLOP and byte counts of each NPU kernel, exactly as its MLIR formulates it, plus an MLIR walker to check them.

``kernel_counts(op, shape, bits, ...)`` -> ``{"flops", "mac_flops", "vector_flops", "transcendentals", "bytes"}``:
``flops`` counts every float arithmetic op the kernel executes (a multiply-add is 2; each exp/tanh/erf/rsqrt 1),
``mac_flops`` the part in contractions, ``bytes`` every argument read once plus every result written once.
``ir_flops(mlir_text, sizes)`` counts the same from a rendered kernel: per linalg op, iteration-space size times
the float ops in its body (loop dims named in the affine maps are bound by ``sizes``, e.g. ``{"m": 1}``).
tests/test_npu_costmodel.py checks that both agree for every kernel, and that ``bytes`` equals what the IREE
CPU run passes in and out.
"""

from __future__ import annotations

import math
import re

from llmopt.errors import LlmoptError

FLOAT_OPS = ("arith.addf", "arith.subf", "arith.mulf", "arith.divf", "arith.maximumf", "arith.negf")
TRANSCENDENTAL_OPS = ("math.exp", "math.tanh", "math.erf", "math.rsqrt")
SOFTMAX_FLOPS = 5  # per element: max, subtract, exp, sum, divide (exp is one of them)


def _qlinear(m, n, k, g, bits, asym, bias, scale_bytes, gemm):
    ng = k // g
    if gemm:  # dequantize once (sub, mul), then the matmul
        mac, vec = 2 * m * n * k, 2 * n * k + (m * n if bias else 0)
    else:  # group partial sums of (q - z) * x (sub, mul, add), then the scale per group (mul, add)
        mac, vec = 2 * m * n * k, m * n * k + 2 * m * n * ng + (m * n if bias else 0)
    bytes_ = 4 * m * k + n * k * bits // 8 + n * ng * scale_bytes * (2 if asym else 1) + (4 * n if bias else 0) + 4 * m * n
    return {"mac_flops": mac, "vector_flops": vec, "transcendentals": 0, "bytes": bytes_}


def _attention(b, hq, hkv, t, s, d, capped, mask_bytes):
    scores = b * hq * t * s
    return {"mac_flops": 4 * scores * d,
            "vector_flops": scores * (3 if capped else 1) + (SOFTMAX_FLOPS - 1) * scores,
            "transcendentals": scores * (2 if capped else 1),
            "bytes": 4 * (b * hq * t * d + 2 * b * hkv * s * d) + mask_bytes + 4 * b * hq * t * d}


def kernel_counts(op: str, shape: dict, bits: int = 4, asym: bool = False, bias: bool = False,
                  softcap: float | None = None, act: str = "silu", scale_bytes: int = 2) -> dict:
    """See the module docstring; ``shape`` keys as in ``llmopt.costmodel.predict_kernel``."""
    try:
        sh = {k: int(v) for k, v in shape.items()}
        if op in ("qgemv", "qgemm"):
            c = _qlinear(sh.get("M", 1), sh["N"], sh["K"], sh.get("G", 128), bits, asym, bias, scale_bytes, op == "qgemm")
        elif op == "attention":
            b, t, s = sh.get("B", 1), sh.get("T", 1), sh["S"]
            c = _attention(b, sh["HQ"], sh["HKV"], t, s, sh["D"], bool(softcap), b * t * s)
        elif op == "sliding_window_attention":  # S: ring slots plus this step's keys; masks from positions
            b, t, s = sh.get("B", 1), sh.get("T", 1), sh["S"]
            c = _attention(b, sh["HQ"], sh["HKV"], t, s, sh["D"], bool(softcap), 8 * s + 8 * t + b * s)
        elif op == "rope_attention":
            b, t, p, hq, hkv, d = sh.get("B", 1), sh.get("T", 1), sh["P"], sh["HQ"], sh["HKV"], sh["D"]
            s = p + t
            c = _attention(b, hq, hkv, t, s, d, False, b * t * s)
            c["vector_flops"] += 4 * b * t * (hq + hkv) * d  # RoPE: negate, two multiplies, add
            c["bytes"] += 4 * (2 * b * t * d + b * t * hkv * d * 2 - b * hkv * t * d)  # cos, sin, k in + krot out; kpast is P
        elif op == "gated_ffn":
            m, h, f, g = sh.get("M", 1), sh["H"], sh["F"], sh.get("G", 128)
            parts = [_qlinear(m, f, h, g, bits, asym, False, scale_bytes, False)] * 2 + \
                    [_qlinear(m, h, f, g, bits, asym, False, scale_bytes, False)]
            c = {k: sum(p[k] for p in parts) for k in parts[0]}
            c["vector_flops"] += m * f * (4 if act == "silu" else 9)
            c["transcendentals"] += m * f
            c["bytes"] -= 4 * m * h + 3 * (4 * m * f)  # x read once, not twice; the [M, F] values stay inside
        elif op == "vl_patch_merger":
            t, cdim, dout, merge = sh["T"], sh["C"], sh["DOUT"], sh.get("MERGE", 4)
            tm, cm = t // merge, cdim * merge
            c = {"mac_flops": 2 * tm * cm * cm + 2 * tm * dout * cm,
                 "vector_flops": 2 * t * cdim + 4 * t * cdim + 5 * tm * cm + tm * dout,
                 "transcendentals": t * cdim + tm * cm,
                 "bytes": 4 * (t * cdim + cdim + cm * cm + cm + dout * cm + dout + tm * dout)}
        else:
            raise LlmoptError(f"cost model: unknown op '{op}'")
    except KeyError as err:
        raise LlmoptError(f"cost model: {op} needs shape key {err.args[0]} (got {sorted(shape)})") from None
    c["flops"] = c["mac_flops"] + c["vector_flops"] + c["transcendentals"]
    return c


# --- the MLIR walker ----------------------------------------------------------------------------------

_GENERIC = re.compile(r"linalg\.generic\s*\{\s*indexing_maps\s*=\s*\[(.*?)\],\s*iterator_types", re.S)
_MAP = re.compile(r"affine_map<\(([^)]*)\)\s*->\s*\(([^)]*)\)>")
_TENSOR = re.compile(r"tensor<([^>]*)>")


def _dims(t: str) -> list[str]:
    return t.split("x")[:-1]


def ir_flops(text: str, sizes: dict[str, int]) -> int:
    """Float ops a rendered kernel executes: see the module docstring. Unknown loop sizes raise LlmoptError."""
    total = 0
    for m in _GENERIC.finditer(text):
        maps = _MAP.findall(m.group(1))
        loops = [d.strip() for d in maps[0][0].split(",")]
        head_end = text.index("^bb0", m.end())
        types = _TENSOR.findall(text[m.end():head_end])
        extent = {}
        for (_, results), ty in zip(maps, types):
            for expr, dim in zip((r.strip() for r in results.split(",")), _dims(ty)):
                if expr in loops and dim != "?":
                    extent[expr] = int(dim)
        for name in loops:
            if name not in extent:
                if name not in sizes:
                    raise LlmoptError(f"ir_flops: loop '{name}' has no static size; pass it in sizes")
                extent[name] = sizes[name]
        body = text[head_end: text.index("linalg.yield", head_end)]
        ops = sum(body.count(op + " ") for op in FLOAT_OPS + TRANSCENDENTAL_OPS)
        total += math.prod(extent.values()) * ops
    for m in re.finditer(r"linalg\.matmul indexing_maps.*?ins\(%\w+, %\w+ : tensor<([^>]*)>, tensor<([^>]*)>\)", text, re.S):
        a, b = _dims(m.group(1)), _dims(m.group(2))
        rows = sizes["m"] if a[0] == "?" else int(a[0])
        total += 2 * rows * int(b[0]) * int(b[1])
    for m in re.finditer(r"linalg\.softmax dimension\(\d\) ins\(%\w+ : tensor<([^>]*)>", text):
        dims = _dims(m.group(1))
        names = iter(sizes["softmax"])  # the dynamic dims of the softmax input, in order
        total += SOFTMAX_FLOPS * math.prod(int(d) if d != "?" else next(names) for d in dims)
    return total
