"""IREE int4 GEMV (the NPU kernel compiled for llvm-cpu) vs the CPU backend's torch int4 path, side by side.

For each weight shape, one random int4 g128 symmetric weight in the packed format goes to three backends in one
process, and ``linear`` on one row (batch-1 decode) is timed interleaved, median of ``--reps``:
- ``iree``: IreeCpuBackend (qgemv.mlir, packed rows unpacked in the kernel),
- ``torch-int4``: CpuBackend quant="fast" (aten._weight_int4pack_mm_for_cpu on a repacked weight),
- ``torch-f32``: CpuBackend quant="reference" (the weight dequantized to float32 at load).
Results are checked against the float64 reference first. The machine is shared (its load average is recorded):
medians carry other jobs' preemptions, minima show what the code does when it gets the cores; both are given and
the ratio is taken on each. Also a row sweep (qgemv vs qgemm) that sets
``QGEMM_MIN_ROWS``, and the AIE2 cost model's NPU prediction for the same call (``predicted: true``).

    .venv/bin/python bench/npu_iree_vs_torch.py [--reps 30] [--out results/bench/npu_iree_vs_torch.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llmopt.backends.cpu import CpuBackend
from llmopt.backends.npu.iree_cpu import IreeCpuBackend
from llmopt.backends.npu.reference import random_quantized
from llmopt.costmodel import predict_kernel
from llmopt.fsutil import write_json

# max |y - y_ref| / max(1, max |y_ref|) allowed before timing. torch's CPU int4 kernel computes at about bf16
# precision (measured ~4e-3 here), the float32 paths at float32 precision.
TOLERANCE = {"iree": 1e-5, "torch-int4": 1e-2, "torch-f32": 1e-5}
SHAPES = [(2048, 2048), (4096, 4096), (3584, 3584), (18944, 3584), (3584, 18944)]  # last three: Qwen2.5-7B


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_shape(n: int, k: int, reps: int, backends: dict) -> dict:
    qt = random_quantized(n, k, 4, 128, gen=torch.Generator().manual_seed(n + k))
    x = torch.randn(1, 1, k)
    ref = (x.double().view(1, k) @ qt.dequantize(torch.float64).T).view(1, 1, n)
    weights = {name: be.linear_weight("w", qt) for name, be in backends.items()}
    row = {"N": n, "K": k, "weight_bytes": qt.nbytes}
    for name, be in backends.items():
        err = (be.linear(x, weights[name]).double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        assert err < TOLERANCE[name], f"{name} {n}x{k}: relative error {err:.2e} over {TOLERANCE[name]}"
        row[f"{name}_rel_err"] = err
    samples = {name: [] for name in backends}
    for _ in range(reps // 5):  # interleave blocks of 5 so load changes hit every backend alike
        for name, be in backends.items():
            samples[name] += timed(lambda: be.linear(x, weights[name]), 5)
    for name, s in samples.items():
        med = statistics.median(s)
        row[f"{name}_ms"] = 1e3 * med
        row[f"{name}_ms_min"] = 1e3 * min(s)
        row[f"{name}_ms_iqr"] = 1e3 * (np.percentile(s, 75) - np.percentile(s, 25))
        row[f"{name}_GBps_best"] = qt.nbytes / min(s) / 1e9
    npu = predict_kernel("qgemv", {"M": 1, "N": n, "K": k, "G": 128}, bits=4)
    row["npu_predicted_ms"], row["npu_predicted_bound"], row["predicted"] = 1e3 * npu["seconds"], npu["bound"], True
    return row


def row_sweep(reps: int) -> list[dict]:
    """qgemv vs qgemm on 4096x4096 as rows grow: where the prefill kernel takes over."""
    be = IreeCpuBackend()
    qt = random_quantized(4096, 4096, 4, 128, gen=torch.Generator().manual_seed(0))
    w = be.linear_weight("w", qt)
    out = []
    for rows in (1, 2, 4, 8, 16, 32):
        x = torch.randn(rows, 4096).numpy()
        r = {"rows": rows}
        for spec in (w.gemv, w.gemm):
            mod = be.module(spec)
            s = timed(lambda: mod(x, *w.args), max(5, reps // 2))
            r[f"{spec.kernel}_ms"], r[f"{spec.kernel}_ms_min"] = 1e3 * statistics.median(s), 1e3 * min(s)
        out.append(r)
    return out


def plot(rows: list[dict], sweep: list[dict], path: Path) -> None:
    """Best-case ms per shape for each backend (+ the NPU prediction, hatched), and the qgemv/qgemm row sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = ["iree", "torch-int4", "torch-f32"]
    width = 0.2
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(rows))], [r[f"{name}_ms_min"] for r in rows], width, label=f"{name} (measured, min)")
    ax.bar([j + 3 * width for j in range(len(rows))], [r["npu_predicted_ms"] for r in rows], width, hatch="//",
           fill=False, label="NPU (predicted, cost model)")
    ax.set_xticks([j + 1.5 * width for j in range(len(rows))], [f"{r['N']}x{r['K']}" for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per call, batch-1 GEMV (int4 g128)")
    ax.legend(fontsize=8)
    ax2.plot([r["rows"] for r in sweep], [r["qgemv_ms_min"] for r in sweep], "o-", label="qgemv (min)")
    ax2.plot([r["rows"] for r in sweep], [r["qgemm_ms_min"] for r in sweep], "s-", label="qgemm (min)")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("rows (tokens x batch), 4096x4096")
    ax2.set_ylabel("ms per call")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30, help="timed calls per backend and shape")
    ap.add_argument("--out", type=Path, default=Path("results/bench/npu_iree_vs_torch.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()[0]
    backends = {"iree": IreeCpuBackend(), "torch-int4": CpuBackend(quant="fast"), "torch-f32": CpuBackend(quant="reference")}
    rows = [bench_shape(n, k, args.reps, backends) for n, k in tqdm(SHAPES, desc="shapes")]
    sweep = row_sweep(args.reps)
    record = {"date": dt.datetime.now(dt.timezone.utc).isoformat(), "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "command": "bench/npu_iree_vs_torch.py --reps %d" % args.reps,
              "loadavg_1min": [load_before, os.getloadavg()[0]],  # a shared machine: other jobs run alongside
              "shapes": rows, "row_sweep": sweep}
    write_json(args.out, record)
    plot(rows, sweep, args.out.with_suffix(".png"))
    print("ms per call, median / min. | N x K | weight MB | IREE qgemv | torch int4 | torch f32 | IREE / torch-int4 "
          "(median, min) | NPU ms (predicted) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cell = {b: f"{r[b + '_ms']:.2f} / {r[b + '_ms_min']:.2f}" for b in backends}
        print(f"| {r['N']} x {r['K']} | {r['weight_bytes'] / 1e6:.1f} | {cell['iree']} | {cell['torch-int4']} | "
              f"{cell['torch-f32']} | {r['iree_ms'] / r['torch-int4_ms']:.2f}, {r['iree_ms_min'] / r['torch-int4_ms_min']:.2f} | "
              f"{r['npu_predicted_ms']:.3f} |")
    print("\n| rows | qgemv ms (median / min) | qgemm ms (median / min) |\n|---|---|---|")
    for r in sweep:
        print(f"| {r['rows']} | {r['qgemv_ms']:.2f} / {r['qgemv_ms_min']:.2f} | {r['qgemm_ms']:.2f} / {r['qgemm_ms_min']:.2f} |")
    print(f"\n1-min load average before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f}; written {args.out}")


if __name__ == "__main__":
    main()
