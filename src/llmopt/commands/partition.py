"""Partition one quantized model over the devices of a target under memory budgets (exact ILP) and draw it.

Reads the packed model folder (its real per-layer bytes), the probes of the devices involved (results/targets/),
the registry entry (for the full-scale Phoenix laptop plan) and a calibration (bench/calibrate.py output; measured
on the fly when absent). Writes partition.json (docs/ARCHITECTURE.md contract) and partition.png beside it. An
absent target or an infeasible budget is recorded in the file (skipped / error) and reported with exit status 1.

    llmopt partition results/qwen2.5-7b-instruct/w4g128/quant --target vulkan \\
        --out results/qwen2.5-7b-instruct/w4g128/vulkan/partition.json --budget vulkan=16GB npu=2GB
"""

from __future__ import annotations

from pathlib import Path

NAME = "partition"
HELP = "assign layers to devices under memory budgets (exact ILP), with the seed heuristic beside it"


def add_arguments(p) -> None:
    p.add_argument("quant_dir", help="quantized model folder (results/{model}/{scheme}/quant)")
    p.add_argument("--target", required=True,
                   help="target whose devices the plan may use (cpu, vulkan, npu, cuda, iree-cpu)")
    p.add_argument("--out", required=True, help="partition.json to write (partition.png goes beside it)")
    p.add_argument("--model", default=None, help="registry id (default: the folder two levels above quant_dir)")
    p.add_argument("--config", default=None, help="workflow config (default config/config.yaml): budgets, lengths")
    p.add_argument("--targets-dir", default="results/targets", help="probe JSONs (default results/targets); "
                   "devices without one are probed now")
    p.add_argument("--calibration", default=None, help="bench/calibrate.py JSON (default: measure now)")
    p.add_argument("--budget", nargs="+", default=None, metavar="DEVICE=SIZE",
                   help="memory budgets overriding the config's, e.g. npu=2GB vulkan=16GB")


def run(args) -> int:
    from llmopt import registry
    from llmopt.backends import BACKENDS, probe
    from llmopt.errors import LlmoptError
    from llmopt.fsutil import read_json
    from llmopt.partition import write_plan

    quant = Path(args.quant_dir)
    reg = registry.load(args.config)
    model_id = args.model or quant.resolve().parent.parent.name
    entry = reg.model(model_id)
    settings = {**reg.config.get("bench", {}), **reg.config.get("partition", {})}
    if args.calibration:
        settings["calibration"] = args.calibration
    if args.budget:
        budgets = {}
        for item in args.budget:
            dev, sep, size = item.partition("=")
            if not sep or dev not in BACKENDS:
                raise LlmoptError(f"--budget: expected DEVICE=SIZE with DEVICE one of {list(BACKENDS)}, got {item!r}")
            budgets[dev] = size
        settings["budgets"] = budgets
    probes = {}
    for dev in BACKENDS:
        path = Path(args.targets_dir) / f"{dev}.json"
        probes[dev] = read_json(path) if path.is_file() else probe(dev)
    rec = write_plan(quant, entry, args.target, probes, settings, Path(args.out))
    if rec.get("skipped") or rec.get("error"):
        print(f"{args.out}: {rec.get('reason') or rec.get('error')}")
        return 1
    segs = ", ".join(f"layers {s['layers'][0]}-{s['layers'][1]} on {s['device']}" for s in rec["segments"])
    pred = rec["predicted"]
    print(f"{model_id}: embedding {rec['embedding']}, {segs}, head {rec['head']}: predicted decode "
          f"{pred['decode_tok_s']:.1f} tok/s, prefill {pred['prefill_tok_s']:.1f} tok/s "
          f"(heuristic {rec['heuristic']['predicted']['decode_tok_s']:.1f}); wrote {args.out}")
    return 0
