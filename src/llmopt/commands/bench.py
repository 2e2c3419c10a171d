"""Benchmark one quantized model on one target: correctness check, then prefill/decode speed and baselines.

Runs ``llmopt.bench.run_benchmark``: the whole model on the target's backend and, when --plan names a partition.json
that spreads it over several devices, that plan too; each checked against the CPU reference backend before it is
timed; HF transformers (float, --source) and llama.cpp (where a GGUF exists) measured in the same run. Writes
bench.json and bench.csv. Exit status 1 when the target is absent or a configuration failed.

    llmopt bench results/gemma-3-270m/w4g128/quant --source results/gemma-3-270m/source --target cpu \\
        --plan results/gemma-3-270m/w4g128/cpu/partition.json --out results/gemma-3-270m/w4g128/cpu/bench.json
    llmopt bench QUANT --source SRC --target cuda --prompt-len 512 --gen-len 128 --batches 1 8 32 --out b.json
"""

from __future__ import annotations

from pathlib import Path

NAME = "bench"
HELP = "measure prefill/decode tok/s, TTFT and memory of a model on a target, after a correctness check"


def add_arguments(p) -> None:
    p.add_argument("quant_dir", help="quantized (or float) model folder")
    p.add_argument("--target", required=True, help="cpu, vulkan, cuda, iree-cpu or npu")
    p.add_argument("--out", required=True, help="bench.json to write (bench.csv goes beside it)")
    p.add_argument("--source", default=None,
                   help="float source folder for the HF / llama.cpp baselines (none: skip them)")
    p.add_argument("--plan", default=None, help="partition.json: also measure its plan when it spans several devices")
    p.add_argument("--probe", default=None, help="probe JSON of the target (default: probe now)")
    p.add_argument("--config", default=None, help="workflow config whose 'bench' section gives the defaults")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default from config: 512)")
    p.add_argument("--gen-len", type=int, default=None, help="decode steps (default from config: 128)")
    p.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes (default from config: 1 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs")
    p.add_argument("--baselines", nargs="*", default=None, help="baselines to run: hf llama.cpp (empty: none)")


def run(args) -> int:
    from llmopt import registry
    from llmopt.backends import probe
    from llmopt.bench import run_benchmark
    from llmopt.fsutil import read_json

    settings = dict(registry.load(args.config).config.get("bench", {}))
    for key in ("prompt_len", "gen_len", "batches", "repeats", "warmup", "baselines"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    pr = read_json(args.probe) if args.probe else probe(args.target)
    rec = run_benchmark(Path(args.quant_dir), Path(args.source) if args.source else None,
                        Path(args.plan) if args.plan else None, args.target, pr, settings, Path(args.out))
    if rec.get("skipped") or rec.get("error"):
        print(f"{args.out}: {rec.get('reason') or rec.get('error')}")
        return 1
    for run_ in rec["runs"]:
        if run_.get("error"):
            print(f"{run_['config']}: {run_['error']}")
        for r in run_.get("results", []):
            print(f"{run_['config']:9s} batch {r['batch']:3d}: prefill {r['prefill_tok_s']['median']:9.1f} tok/s  "
                  f"decode {r['decode_tok_s']['median']:8.1f} tok/s  TTFT {r['ttft_s']['median']:.3f} s")
    for b in rec.get("baselines", []):
        if "decode_tok_s" in b:
            print(f"{b['name']:9s} batch   1: prefill {b['prefill_tok_s']['median']:9.1f} tok/s  "
                  f"decode {b['decode_tok_s']['median']:8.1f} tok/s  ({b['engine']})")
        else:
            print(f"{b['name']:9s}: {b.get('error') or b.get('reason')}")
    return 1 if any(r.get("error") for r in rec["runs"]) else 0
