"""AIE2 (AMD Phoenix, XDNA1 "npu1") cost model: predicted time of each NPU kernel, for the partitioner.

    from llmopt.costmodel import predict_kernel
    predict_kernel("qgemv", {"M": 1, "N": 4096, "K": 4096, "G": 128}, bits=4)
    # {"seconds": ..., "flops": ..., "bytes": ..., "bound": "memory", "predicted": True, ...}

The model (assumptions in docs/NPU.md, hardware facts from ../shared/reference/FACTS.md §3):
time = launch + max(compute, data movement), the roofline of one kernel call with DMA overlapping compute.
- compute: multiply-accumulates at the bf16 MAC rate of the tiles in use (weights are dequantized to bf16
  on the tile; int4/int8 codes do not raise the rate for float activations), every other float op on the
  vector unit; math.exp/tanh/erf/rsqrt count ``TRANSCENDENTAL_COST`` vector ops each.
- data movement: every kernel argument read once and every result written once through the shim DMAs
  (2 MM2S + 2 S2MM channels per column, 32 bits a cycle each), capped by the shared DRAM bandwidth.
- launch: a fixed cost per kernel call (XRT command submission and completion).
- tiles: the local working set of one tile (double-buffered input blocks + accumulators) must fit 64 KiB;
  ``tiling`` reports the block shape chosen and refuses shapes with no fitting block.
FLOP and byte counts come from ``llmopt.costmodel.counts`` and are checked against the kernels' MLIR and
their IREE CPU runs (tests/test_npu_costmodel.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from llmopt.costmodel.counts import kernel_counts
from llmopt.errors import LlmoptError

TRANSCENDENTAL_COST = 4  # vector ops per exp/tanh/erf/rsqrt (polynomial or LUT + fix-up); an assumption


@dataclass(frozen=True)
class Aie2Spec:
    """An AIE2 array as the compiler's npu1_4col target sees it; every field is an assumption to calibrate."""

    name: str = "AMD Phoenix NPU (XDNA1, npu1_4col)"
    columns: int = 4  # the 4-column partition of the 5x(4 compute + 1 memory + 1 shim) array
    compute_rows: int = 4
    clock_hz: float = 1.0e9  # 10 TOPS int8 rated = 20 tiles x 256 MAC x 2 x ~1 GHz
    bf16_macs_per_cycle: int = 128  # per tile (int8: 256)
    vector_flops_per_cycle: int = 16  # per tile: 512-bit vector unit, 16 fp32 lanes, non-MAC ops
    local_bytes: int = 64 * 1024  # data memory per compute tile
    memtile_bytes: int = 512 * 1024  # per column
    shim_channels: int = 2  # DMA channels each way per shim tile (column)
    channel_bytes_per_cycle: int = 4
    dram_bytes_per_s: float = 89.6e9  # DDR5-5600 dual channel, shared with CPU and GPU
    launch_s: float = 30e-6  # per kernel call: XRT submission + completion (order of tens of microseconds)
    dma_efficiency: float = 0.8  # fraction of the shim DMA peak a streaming kernel sustains
    mac_efficiency: float = 0.5  # fraction of the bf16 MAC peak a tiled GEMM sustains (hand-tuned IRON-class)

    @property
    def tiles(self) -> int:
        return self.columns * self.compute_rows

    @property
    def dma_bytes_per_s(self) -> float:
        return min(self.columns * self.shim_channels * self.channel_bytes_per_cycle * self.clock_hz,
                   self.dram_bytes_per_s)

    @property
    def peak_bf16_flops(self) -> float:
        return 2.0 * self.tiles * self.bf16_macs_per_cycle * self.clock_hz


PHOENIX = Aie2Spec()


def tiling(op: str, shape: dict, bits: int, spec: Aie2Spec = PHOENIX) -> dict:
    """The per-tile block the model assumes, and its local-memory footprint (double-buffered inputs)."""
    local = spec.local_bytes
    if op in ("qgemv", "qgemm", "gated_ffn", "vl_patch_merger"):
        m = min(int(shape.get("M", shape.get("T", 1))), 64)
        g = int(shape.get("G", 64))
        for nt, kt in ((64, 256), (32, 256), (32, 128), (16, 128), (16, 64), (8, 32)):
            kt = max(kt - kt % g, g) if g <= kt else kt
            w = nt * kt * bits / 8 + nt * max(1, kt // g) * 2 * 2  # codes + scales and zeros (bf16)
            need = 2 * (w + m * kt * 2) + m * nt * 4  # double-buffered weight and x blocks, fp32 accumulators
            if need <= local:
                return {"block": {"rows": m, "n": nt, "k": kt}, "local_bytes": int(need), "fits": True}
        raise LlmoptError(f"cost model: {op} {shape}: no block of {m} rows fits {local} bytes of tile memory")
    if op in ("attention", "sliding_window_attention", "rope_attention"):
        d = int(shape["D"])
        for t in sorted({min(int(shape.get("T", 1)), q) for q in (16, 8, 4, 1)}, reverse=True):
            for chunk in (256, 128, 64, 32, 16):
                need = 2 * (2 * chunk * d * 2) + t * d * 4 + t * chunk * 4 + t * d * 4  # K,V bf16 x2 buf, q, scores, acc
                if need <= local:
                    return {"block": {"queries": t, "keys": chunk, "head_dim": d}, "local_bytes": int(need), "fits": True}
        raise LlmoptError(f"cost model: {op} head_dim {d}: no key chunk fits {local} bytes of tile memory")
    raise LlmoptError(f"cost model: unknown op '{op}'")


def predict_kernel(op: str, shape: dict, bits: int = 4, spec: Aie2Spec = PHOENIX, **variant) -> dict:
    """Predicted time of one call of kernel ``op`` at ``shape`` on the NPU (never a measurement).

    ``op``: a kernel of ``kernels/`` (qgemv, qgemm, attention, sliding_window_attention, rope_attention,
    gated_ffn, vl_patch_merger). ``shape``: its sizes, e.g. ``{"M", "N", "K", "G"}`` for the quantized linears,
    ``{"B", "T", "S", "HQ", "HKV", "D"}`` for attention (``P`` past keys for rope_attention), ``{"M", "H", "F",
    "G"}`` for gated_ffn, ``{"T", "C", "DOUT"}`` for the merger. ``bits``: weight bits (2, 4, 8); ``variant``:
    ``asym``, ``bias``, ``softcap``, ``act``, ``scale_bytes`` as the kernel's template flags.
    Returns ``{"seconds", "flops", "bytes", "bound", "compute_s", "memory_s", "launch_s", "tiling", "predicted":
    True, "device"}``; ``bound`` is "memory", "compute" or "launch", whichever dominates."""
    counts = kernel_counts(op, shape, bits, **variant)
    tile = tiling(op, shape, bits, spec)
    compute = (counts["mac_flops"] / (spec.peak_bf16_flops * spec.mac_efficiency)
               + (counts["vector_flops"] + TRANSCENDENTAL_COST * counts["transcendentals"])
               / (spec.tiles * spec.vector_flops_per_cycle * spec.clock_hz))
    memory = counts["bytes"] / (spec.dma_bytes_per_s * spec.dma_efficiency)
    parts = {"compute": compute, "memory": memory, "launch": spec.launch_s}
    return {
        "op": op, "shape": dict(shape), "bits": bits,
        "seconds": spec.launch_s + max(compute, memory),
        "flops": counts["flops"], "bytes": counts["bytes"],
        "bound": max(parts, key=parts.get),
        "compute_s": compute, "memory_s": memory, "launch_s": spec.launch_s,
        "tiling": tile, "predicted": True, "device": spec.name,
    }


def npu_ceilings(spec: Aie2Spec = PHOENIX) -> dict:
    """The NPU as one roofline device, for ``llmopt.roofline`` (keys of its Device); all predicted."""
    return {"bandwidth": spec.dma_bytes_per_s, "flops": spec.peak_bf16_flops, "bw_eff": spec.dma_efficiency,
            "flops_eff": spec.mac_efficiency, "op_overhead_s": spec.launch_s, "predicted": True}


def predict_layer(args, bits: int = 4, group: int = 128, context: int = 1024, tokens: int = 1, batch: int = 1,
                  layer: int = 0, spec: Aie2Spec = PHOENIX) -> dict:
    """Predicted time of one decoder layer on the NPU (``args``: ``llmopt.engine.ModelArgs``): q/k/v/o as qgemv
    (decode) or qgemm, attention over ``context`` keys (the window on sliding layers), the fused gated FFN for
    decode (three qgemm calls for prefill). Norms, RoPE and residual adds are not NPU kernels: not counted."""
    rows = tokens * batch
    lin = "qgemv" if rows == 1 else "qgemm"  # what the NPU build compiles: one decode row, or prefill buckets
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    window = args.windows[layer] if args.windows else None
    keys = min(context, window) if window else context
    calls = [predict_kernel(lin, {"M": rows, "N": n, "K": k, "G": min(group, k)}, bits, spec, bias=args.qkv_bias and n != args.hidden)
             for n, k in ((q, args.hidden), (kv, args.hidden), (kv, args.hidden), (args.hidden, q))]
    attn = "sliding_window_attention" if window else "attention"
    calls.append(predict_kernel(attn, {"B": batch, "T": tokens, "S": keys, "HQ": args.n_heads, "HKV": args.n_kv_heads,
                                       "D": args.head_dim}, bits, spec, softcap=args.attn_softcap))
    if lin == "qgemv":
        calls.append(predict_kernel("gated_ffn", {"M": rows, "H": args.hidden, "F": args.ffn, "G": group}, bits, spec,
                                    act=args.act))
    else:
        calls += [predict_kernel("qgemm", {"M": rows, "N": n, "K": k, "G": group}, bits, spec)
                  for n, k in ((args.ffn, args.hidden), (args.ffn, args.hidden), (args.hidden, args.ffn))]
    return {"seconds": sum(c["seconds"] for c in calls), "flops": sum(c["flops"] for c in calls),
            "bytes": sum(c["bytes"] for c in calls), "kernels": calls, "predicted": True, "device": spec.name}


def describe(spec: Aie2Spec = PHOENIX) -> dict:
    """The model's constants and derived peaks, for docs and reports."""
    return {**asdict(spec), "tiles": spec.tiles, "dma_bytes_per_s": spec.dma_bytes_per_s,
            "peak_bf16_flops": spec.peak_bf16_flops, "transcendental_cost": TRANSCENDENTAL_COST, "predicted": True}
