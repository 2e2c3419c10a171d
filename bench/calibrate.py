"""Calibrate the roofline on the targets present here: host ceilings and each backend's own kernels.

Measures (``llmopt.roofline.calibrate``): host copy bandwidth and float32/bf16 matmul FLOP/s with torch (on a
CUDA machine also device copy bandwidth and bf16 matmul), then through each present backend's ``Backend``
interface a 4-bit group-128 GEMV (decode), the same weight at ``--prefill-tokens`` rows (prefill), the cost of a
tiny op and host<->device transfers. Absent targets are recorded with their reason. The output feeds
``llmopt partition`` (settings ``calibration``) and the report.

    python bench/calibrate.py --targets cpu vulkan --out results/calibration.json
    python bench/calibrate.py --targets cpu cuda vulkan --repeats 10 --out results/calibration-h100.json  # GPU box
"""

from __future__ import annotations

import argparse
import json
import sys

from llmopt.fsutil import write_json
from llmopt.roofline import calibrate, calibrated_profile


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", nargs="+", default=["cpu", "vulkan"],
                   help="targets to calibrate (absent ones are recorded)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per micro-benchmark (median kept)")
    p.add_argument("--size", type=int, default=4096, help="square int4 weight size of the GEMV/GEMM (multiple of 128)")
    p.add_argument("--prefill-tokens", type=int, default=64, help="rows of the prefill GEMM")
    p.add_argument("--host-mib", type=int, default=256, help="MiB copied by the host bandwidth test")
    p.add_argument("--out", required=True, help="calibration JSON to write")
    args = p.parse_args(argv)
    result = calibrate(args.targets, args.repeats, args.size, args.prefill_tokens, args.host_mib)
    write_json(args.out, result)
    try:
        profile = calibrated_profile(result)
        for dev in profile.devices.values():
            print(f"{dev.name:9s} bw {dev.bandwidth / 1e9:7.2f} GB/s x {dev.bw_eff:.3f}  "
                  f"flops {dev.flops / 1e9:8.1f} GFLOP/s x {dev.flops_eff:.4f}  op {dev.op_overhead_s * 1e6:7.1f} us")
    except Exception as err:  # noqa: BLE001 - the JSON is the product; the summary is a courtesy
        print(f"no profile: {err}", file=sys.stderr)
    print(json.dumps(result["backends"], indent=1, default=str)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
