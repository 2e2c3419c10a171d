"""Cost of the quantize stage at full scale: time and peak RSS quantizing a synthetic Qwen2.5-7B on this CPU.

The full-scale synthetic folder (real shapes, random bf16 values, ~15 GB) is written once by the workflow's
``llmopt.download.fetch(..., scale="full")`` into ``--src``; the quantization then runs in a fresh subprocess so
its peak RSS (VmHWM) is the stage's own, not the generator's. Appends one JSON line per run to ``OUT/cost.jsonl``.

    .venv/bin/python bench/quant_cost.py --src /tmp/qwen7b-full --out bench/out/quant-cost [--scheme w4g128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

_CHILD = """
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[4]))
from llmopt.quant.pipeline import quantize_model
t = time.time()
q = quantize_model(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), {})
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
print(json.dumps({"scheme": sys.argv[2], "seconds": round(time.time() - t, 1), "peak_rss_mb": round(hwm),
                  "params": q["params"], "bytes": q["bytes"], "bits_per_weight": q["bits_per_weight"],
                  "compression": q["compression"], "mean_rel_error": q["mean_rel_error"]}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-7b-instruct", help="registry id (default qwen2.5-7b-instruct)")
    p.add_argument("--src", type=Path, required=True, help="full-scale source folder (created if missing)")
    p.add_argument("--out", type=Path, default=Path("bench/out/quant-cost"), help="results folder")
    p.add_argument("--scheme", action="append", help="scheme preset (default w4g128)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the quantization (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the quantized folder")
    args = p.parse_args(argv)
    import yaml

    from llmopt.download import fetch

    if not (args.src / "config.json").exists():
        entry = yaml.safe_load(Path("config/models.yaml").read_text())["models"][args.model]
        t = time.time()
        fetch(args.model, entry, args.src, "full")
        print(f"generated {args.src} in {time.time() - t:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    for scheme in args.scheme or ["w4g128"]:
        dest = args.out / f"{args.model}-{scheme}"
        got = subprocess.run([sys.executable, "-c", _CHILD, str(args.src), scheme, str(dest), str(args.threads)], text=True,
                             stdout=subprocess.PIPE)
        if got.returncode:
            return got.returncode
        row = {"model": args.model, "threads": args.threads, "date": time.strftime("%Y-%m-%d"), **json.loads(got.stdout.strip().splitlines()[-1])}
        print(json.dumps(row), flush=True)
        with open(args.out / "cost.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if not args.keep:
            import shutil

            shutil.rmtree(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
