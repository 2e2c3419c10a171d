"""Analyse the registry's models at full scale and predict their speed on every target profile.

Writes into --out: ``analysis.json`` (per model and precision: parameters, weight bytes, KV-cache bytes per token,
FLOPs and bytes of a 512-token prefill and of a decode step), ``ops/<model>.csv`` (the same per layer and op) and
``predictions.csv`` (predicted and ceiling prefill/decode tok/s per model, precision, profile and device, beside the
seed's target) and ``plans.csv`` (the Phoenix laptop partition: exact ILP plan against the seed's NPU-coverage
heuristic under the config's budgets, and the batch at which the aggregate reaches the seed's target). Profiles: the
Phoenix laptop with DDR5-5600 and LPDDR5x-7500, H100, H200 (stated ceilings), and ``here`` when --calibration names
a bench/calibrate.py output.

    llmopt analyze --out results/analysis
    llmopt analyze --models qwen2.5-7b-instruct --bpw 16 4.125 2.5 --calibration results/calibration.json
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

NAME = "analyze"
HELP = "per-layer/op bytes, FLOPs and KV cache of the models at full scale, and roofline tok/s per target"


def add_arguments(p) -> None:
    p.add_argument("--config", default=None,
                   help="workflow config (default config/config.yaml); its models are analysed")
    p.add_argument("--models", nargs="+", default=None, help="model ids (default: the config's models)")
    p.add_argument("--bpw", nargs="+", type=float, default=[16.0, 4.125],
                   help="bits per weight of the decoder linears to analyse (default: "
                        "16 = bf16, and 4.125 = 4-bit g128)")
    p.add_argument("--prompt", type=int, default=512, help="prompt length of the prefill (default 512)")
    p.add_argument("--gen", type=int, default=128,
                   help="decode length; decode is costed at prompt + gen/2 (default 128)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16], help="batch sizes to predict (default 1 16)")
    p.add_argument("--calibration", default=None, help="bench/calibrate.py JSON: adds the measured 'here' profile")
    p.add_argument("--out", default="results/analysis", help="output folder (default results/analysis)")


def run(args) -> int:
    from llmopt import registry, roofline
    from llmopt.analysis import Arch, Precision, analyze
    from llmopt.errors import LlmoptError
    from llmopt.fsutil import read_json, write_json, write_text

    reg = registry.load(args.config)
    ids = args.models or list(reg.models)
    models = {m: reg.model(m) for m in ids}
    if any(b <= 0 or b > 32 for b in args.bpw):
        raise LlmoptError(f"--bpw: bits per weight must lie in (0, 32], got {args.bpw}")
    precisions = [Precision(linear_bpw=b, name="bf16" if b == 16 else f"{b:g}bpw") for b in args.bpw]
    profiles = roofline.stated_profiles()
    if args.calibration:
        profiles["here"] = roofline.calibrated_profile(read_json(args.calibration))
    out = Path(args.out)
    summary = {}
    for model_id, entry in models.items():
        arch = Arch.from_entry(entry, model_id)
        summary[model_id] = {p.name: analyze(arch, p).summary(args.prompt, args.prompt + args.gen // 2)
                             for p in precisions}
        table = analyze(arch, precisions[0]).table(args.prompt, args.prompt + args.gen // 2)
        write_text(out / "ops" / f"{model_id}.csv", _csv(table))
    write_json(out / "analysis.json", summary)
    write_text(out / "plans.csv", _csv(_laptop_rows(models, precisions, reg.config, args)))
    rows = roofline.prediction_table(models, precisions, profiles, args.prompt, args.gen, tuple(args.batches))
    write_text(out / "predictions.csv", _csv(rows))
    print(f"{'model':24s} {'prec':8s} {'GB':>6s}  " + "  ".join(f"{k:>14s}" for k in ("ddr5 780M", "ddr5 ceil",
                                                                                   "h100 cuda", "seed")))
    for model_id in models:
        for p in precisions:
            pick = {(r["profile"], r["device"]): r for r in rows
                    if r["model"] == model_id and r["precision"] == p.name and r["batch"] == 1}
            lap, gpu = pick[("phoenix-ddr5", "vulkan")], pick[("h100", "cuda")]
            seed = f"{lap['seed_tok_s_low']}-{lap['seed_tok_s_high']}" if lap["seed_tok_s_low"] else "-"
            print(f"{model_id:24s} {p.name:8s} {lap['weight_gb']:6.2f}  {lap['decode_tok_s']:14.1f}  "
                  f"{lap['ceiling_decode_tok_s']:14.1f}  {gpu['decode_tok_s']:14.1f}  {seed:>14s}")
    print(f"wrote {out}/analysis.json, {out}/predictions.csv, {out}/plans.csv, {out}/ops/*.csv")
    return 0


def _laptop_rows(models: dict, precisions: list, config: dict, args) -> list[dict]:
    from llmopt.analysis import Arch
    from llmopt.partition import budgets_from, laptop_plan

    settings = {**config.get("bench", {}), **config.get("partition", {}), "prompt_len": args.prompt,
                "gen_len": args.gen}
    budgets = budgets_from(settings)
    rows = []
    for model_id, entry in models.items():
        arch = Arch.from_entry(entry, model_id)
        seed = entry.get("seed") or {}
        low = (seed.get("tok_s") or [None])[0]
        for prec in precisions:
            lap = laptop_plan(arch, prec, settings, budgets, seed)
            for prof in ("phoenix-ddr5", "phoenix-lpddr5x"):
                p = lap[prof]
                h = p["heuristic"]
                row = {"model": model_id, "precision": prec.name, "profile": prof, "seed_tok_s_low": low,
                       "error": p.get("error"), "heuristic_rule": h["rule"],
                       "heuristic_decode_tok_s": h["predicted"]["decode_tok_s"], "heuristic_feasible": h["feasible"],
                       "heuristic_violations": "; ".join(f"{d}: {v}" for d, v in h["violations"].items())}
                if "predicted" in p:
                    sweep = p.get("batch_sweep") or {}
                    row.update({"plan": " ".join(f"{s['layers'][0]}-{s['layers'][1]}:{s['device']}"
                                                 for s in p["segments"]),
                                "embedding": p["embedding"], "head": p["head"],
                                "decode_tok_s": p["predicted"]["decode_tok_s"],
                                "prefill_tok_s": p["predicted"]["prefill_tok_s"],
                                "ceiling_decode_tok_s": p["predicted"]["ceiling_decode_tok_s"],
                                "vs_heuristic": p["speedup_vs_heuristic"]["decode"],
                                "batch16_tok_s": sweep.get(16),
                                "batch_for_seed": next((b for b, v in sorted(sweep.items()) if low and v >= low),
                                                       None)})
                rows.append(row)
    return rows


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()
