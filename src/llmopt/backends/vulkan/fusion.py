"""Fused linears for ``VulkanBackend.linears``: weights that read the same input, run as one mat-vec dispatch.

    fused = fused_weight(be, (wq, wk, wv))   # a VkWeight over their rows, or None (then one dispatch each)

The first call for a tuple of weights copies their codes, scales and zero points into one device buffer, region
by region (all codes, then all scales, then all zero points, so the fused weight has the ordinary layout), and
a fused bias (zeros where a weight has none). Each original ``VkWeight`` is then re-pointed at its rows of that
buffer and its own buffer freed: no memory is doubled, and ``linear`` on an original still works. The mat-vec
and mat-mul shaders write the fused rows to one output per weight (``seg1``/``seg2`` push constants).

Fusable: 2 or 3 weights with the same input size, bit width, group, scale dtype and zero points, one piece each,
whose row ranges in the fused buffer start on the device's storage-buffer offset alignment and fit its range.
Not inside a replayable recording (the copies need a submit): those weights fuse on a later eager call.
"""

from __future__ import annotations

import numpy as np

from llmopt.backends.vulkan.backend import Piece, VkWeight, VulkanBackend


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
