"""Fused linears for ``VulkanBackend.linears``: weights that read the same input, run as one mat-vec dispatch; and
the mat-vec epilogues' host side (``shaders/matvec_quant.glsl``'s EPILOGUE).

    fused = fused_weight(be, (wq, wk, wv))   # a VkWeight over their rows, or None (then one dispatch each)
    x, normed = linear_add_rmsnorm(be, attn, wo, x, ffn_norm, eps, False, (w_gate, w_up))

The first call for a tuple of weights copies their codes, scales and zero points into one device buffer, region
by region (all codes, then all scales, then all zero points, so the fused weight has the ordinary layout), and
a fused bias (zeros where a weight has none). Each original ``VkWeight`` is then re-pointed at its rows of that
buffer and its own buffer freed: no memory is doubled, and ``linear`` on an original still works. The mat-vec
and mat-mul shaders write the fused rows to one output per weight (``seg1``/``seg2`` push constants).

Fusable: 2 or 3 weights with the same input size, bit width, group, scale dtype and zero points, one piece each,
whose row ranges in the fused buffer start on the device's storage-buffer offset alignment and fit its range.
Not inside a replayable recording (the copies need a submit): those weights fuse on a later eager call.

``linear_add_rmsnorm`` (``VulkanBackend.fuse_matvec_norm``): the o or down projection whose epilogue adds the
residual and writes the next RMSNorm as x8 rows and chunk sums of squares only (``VkAct.rms``), for int4 readers;
``epilogue_x8``: the x8 rows such an epilogue (or the gated mat-vec's) writes, where they may be written.
"""

from __future__ import annotations

import math

import numpy as np

from llmopt.backends.vulkan.backend import COUNTER_WORDS, MATVEC_MAX_M, Epilogue, Piece, VkAct, VkWeight, VulkanBackend
from llmopt.backends.vulkan.device import Buffer
from llmopt.errors import LlmoptError


def fused_weight(be: VulkanBackend, ws: tuple) -> VkWeight | None:
    """The fused weight of ``ws`` (made on first use), or None where they cannot share one dispatch."""
    key = tuple(id(w) for w in ws)
    hit = be._fused.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], ws)):
        return hit[1]
    if be.dev.capturing:  # fusing submits copies, which a replayable recording cannot: fused on a later call
        return None
    first = ws[0]
    same = all((w.k, w.bits, w.group, w.scale_bf16, w.has_zeros) == (first.k, first.bits, first.group,
               first.scale_bf16, first.has_zeros) and len(w.pieces) == 1 for w in ws)
    taken = any(w is v for done, f in be._fused.values() if f is not None for v in done for w in ws)
    regions = _layout(be, ws) if same and not taken else None
    fused = _concatenate(be, ws, regions) if regions is not None else None
    be._fused[key] = (ws, fused)
    return fused


def _layout(be: VulkanBackend, ws: tuple) -> list | None:
    """Per range kind (codes, scales, zeros): its offset in the fused buffer and each weight's bytes there;
    None if a weight's sub-range would break the offset alignment or a range exceeds the device's limit."""
    regions, total = [], 0
    for kind in ("w", "s", "z"):
        ranges = [getattr(w.pieces[0], kind) for w in ws]
        if ranges[0] is None:
            continue
        # codes ranges are whole rows of words; scale/zero ranges may end in 2 bytes of padding
        sizes = [r[2] if kind == "w" else w.n_out * (w.k // w.group) * 2 for w, r in zip(ws, ranges)]
        starts = [total + sum(sizes[:i]) for i in range(len(ws))]
        if any(s % be.dev.align for s in starts) or sum(sizes) > be.dev.max_range:
            return None
        regions.append((kind, starts, sizes))
        total = -(-(starts[-1] + sizes[-1]) // be.dev.align) * be.dev.align
    return regions


def _concatenate(be: VulkanBackend, ws: tuple, regions: list) -> VkWeight:
    """One buffer holding ``ws``' rows region by region; the originals re-pointed at their rows, then freed."""
    end = max(starts[-1] + sizes[-1] for _, starts, sizes in regions)
    buf = be.dev.buffer(end + 16, name="+".join(w.name for w in ws))
    fused_ranges = {}
    for kind, starts, sizes in regions:
        for w, start, size in zip(ws, starts, sizes):
            src, off, _ = getattr(w.pieces[0], kind)
            be.dev.copy(src, buf, size, off, start)
        fused_ranges[kind] = (buf, starts[0], max(4, -(-sum(sizes) // 4) * 4))
    n_out = sum(w.n_out for w in ws)
    bias = None
    if any(w.bias is not None for w in ws):
        bias = be.dev.buffer(4 * n_out, name="fused bias")
        row = 0
        for w in ws:
            if w.bias is not None:
                be.dev.copy(w.bias, bias, 4 * w.n_out, 0, 4 * row)
            else:
                be.dev.upload(bias, np.zeros(w.n_out, np.float32), 4 * row)
            row += w.n_out
    be._flush()
    be.weight_bytes += buf.nbytes + (bias.nbytes if bias else 0)
    for i, w in enumerate(ws):  # the originals now read their rows of the fused buffer
        old = w.pieces[0]
        sub = {kind: (buf, starts[i], max(4, -(-sizes[i] // 4) * 4)) for kind, starts, sizes in regions}
        w.pieces = [Piece(0, w.n_out, buf, sub["w"], sub.get("s"), sub.get("z"))]
        be.weight_bytes -= old.buf.nbytes
        be.dev.free(old.buf)
    first = ws[0]
    return VkWeight("+".join(w.name for w in ws), n_out, first.k, first.bits, first.group, first.scale_bf16,
                    first.has_zeros, [Piece(0, n_out, buf, fused_ranges["w"], fused_ranges.get("s"),
                                            fused_ranges.get("z"))], bias)


def linear_add_rmsnorm(be: VulkanBackend, x: VkAct, w: VkWeight, res: VkAct, weight: Buffer, eps: float,
                       unit_offset: bool, readers: tuple) -> tuple[VkAct, VkAct]:
    """``VulkanBackend.linear_add_rmsnorm``: one mat-vec (EPILOGUE 2) where ``fuse_matvec_norm`` is on, ``w`` is one
    piece, its outputs whole chunks of 32 at decode rows, and every one of ``readers`` an int4 weight over them;
    else ``linear`` then ``add_rmsnorm``."""
    n = w.n_out
    q8 = None
    if (be.fuse_matvec_norm and readers and x.rms is None and len(w.pieces) == 1 and res.shape[-1] == n
            and all(isinstance(r, VkWeight) and r.bits == 4 and r.k == n for r in readers)):
        q8 = epilogue_x8(be, res.shape)
    if q8 is None:
        return be.add_rmsnorm(res, be.linear(x, w), weight, eps, unit_offset)
    if x.features != w.k:
        raise LlmoptError(f"linear {w.name}: input has {x.features} features, weight expects {w.k}")
    if res.shape[:-1] != x.shape[:-1]:
        raise LlmoptError(f"linear_add_rmsnorm: residual {list(res.shape)} and input {list(x.shape)} differ in rows")
    be._check_norm_weight("linear_add_rmsnorm", weight, n)
    total = be._new(res.shape)
    normed = VkAct(be, None, res.shape, q8, be._alloc(4 * res.rows * (n // 32), "rms sums"), float(eps))
    be._matmul(x, w, [total], x.rows, 1, 0,
               epilogue=Epilogue(2, q8, res.buf, weight, normed.rms, float(eps), 1.0 if unit_offset else 0.0))
    return total, normed


def epilogue_x8(be: VulkanBackend, shape: tuple) -> Buffer | None:
    """x8 rows for a mat-vec epilogue to write into (``shape`` its output), or None where none may: int-dot mat-vecs
    reading x8 rows off, more than ``MATVEC_MAX_M`` rows, features not a multiple of 32, or more chunks than the
    completion counters hold."""
    f, rows = shape[-1], math.prod(shape[:-1])
    if (be.matvec_x_q8 and be.matvec_int_dot and rows <= MATVEC_MAX_M and f % 32 == 0
            and rows * (f // 32) <= COUNTER_WORDS):
        return be._alloc(rows * 160 * -(-f // 128), "x8")  # x8.glsl: 10 uvec4 per 4 chunks of 32
    return None
