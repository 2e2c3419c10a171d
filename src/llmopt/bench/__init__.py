"""Benchmark one model x scheme x target: correctness first, then prefill/decode speed, beside the baselines.

``run_benchmark(quant_dir, source_dir, plan_path, target, probe, settings, out)`` writes ``bench.json`` (and
``bench.csv`` beside it) and returns the record. It measures up to two configurations of our engine:

- ``target``: the whole model on the target's backend;
- ``partition``: the plan of ``partition.json`` (several backends), when it differs from the first.

Each is first checked against the reference (the CPU backend in ``quant="reference"`` mode: float32 ops on the
dequantized packed weights) on a fresh prompt, prefill and decode paths both; a failing check is recorded and that
configuration is not timed. Then for every batch size: ``warmup`` untimed and ``repeats`` timed runs of a
``prompt_len``-token prefill and ``gen_len`` greedy decode steps (median, min, max, spread), TTFT, peak memory.
Baselines run in the same process with the same lengths: HF transformers (float source folder) and llama.cpp
(llama-cpp-python) where a GGUF exists. A target absent at probe time, or present then but gone now
(``vanished``), gives ``{"skipped": true, "reason": ...}``. Every failure is recorded, never raised.

Settings (``config.yaml`` ``bench:``; defaults in ``DEFAULTS``): prompt_len, gen_len, batches, warmup, repeats,
check_tokens, tolerance (a number or {target: number}), baselines (["hf", "llama.cpp"]), hf_dtype.

    llmopt bench results/gemma-3-270m/w4g128/quant --source results/gemma-3-270m/source --target cpu --out /tmp/b.json
"""

from __future__ import annotations

import csv
import datetime
import io
from pathlib import Path

from llmopt.bench.env import environment
from llmopt.errors import LlmoptError
from llmopt.fsutil import read_json, write_json, write_text

# Tolerances (relative L2 error of the logits against the float32 reference) admit bf16 activations through a
# real model's depth (the CPU backend's bf16 kernels give 6% on the real Gemma 3 270M, top-1 agreement 0.94) and
# still catch a broken kernel (errors of order 1).
DEFAULTS = {"prompt_len": 512, "gen_len": 128, "batches": [1, 4], "warmup": 1, "repeats": 3, "check_tokens": 32,
            "tolerance": {"cpu": 0.1, "cuda": 0.1, "vulkan": 0.1, "iree-cpu": 0.1, "npu": 0.1},
            "baselines": ["hf", "llama.cpp"], "hf_dtype": "float32"}


def _settings(settings: dict | None) -> dict:
    s = {**DEFAULTS, **(settings or {})}
    for key in ("prompt_len", "gen_len", "warmup", "repeats", "check_tokens"):
        if not isinstance(s[key], int) or s[key] < (0 if key == "warmup" else 1):
            raise LlmoptError(f"bench settings: '{key}' must be a positive integer, got {s[key]!r}")
    if not isinstance(s["batches"], list) or not s["batches"] or any(not isinstance(b, int) or b < 1
                                                                      for b in s["batches"]):
        raise LlmoptError(f"bench settings: 'batches' must be a list of positive integers, got {s['batches']!r}")
    if s["check_tokens"] < 4:
        raise LlmoptError("bench settings: 'check_tokens' must be at least 4 (prefill + decode steps)")
    return s


def _tolerance(s: dict, target: str) -> float:
    tol = s["tolerance"]
    return float(tol.get(target, 0.1) if isinstance(tol, dict) else tol)


def _plan_of(plan_rec: dict) -> dict | None:
    """The engine plan (segments, embedding, head) of a partition record, or None when it has none."""
    if not plan_rec or plan_rec.get("skipped") or plan_rec.get("error") or not plan_rec.get("segments"):
        return None
    return {"segments": [{"layers": s["layers"], "device": s["device"]} for s in plan_rec["segments"]],
            "embedding": plan_rec.get("embedding"), "head": plan_rec.get("head")}


# Constructor option naming the compile stage's output, per backend that loads compiled kernels.
_KERNEL_DIR_OPTION = {"vulkan": "kernel_dir", "iree-cpu": "kernels_dir"}


def _backends(names, kernel_dirs: dict) -> dict:
    """Backend instances for ``names``, loading the compile stage's kernels (``kernel_dirs``) where it made them,
    so what is measured is what the workflow compiled."""
    from llmopt.backends import get_backend

    return {name: get_backend(name, **({_KERNEL_DIR_OPTION[name]: kernel_dirs[name]}
                                       if name in _KERNEL_DIR_OPTION and name in kernel_dirs else {}))
            for name in names}


def _measure(label, quant_dir, backend, plan, reference, vocab, s, target, progress) -> dict:
    """Load, check, time one configuration; every failure lands in the returned dict."""
    from llmopt.bench.measure import PeakMemory, check_correctness, time_engine
    from llmopt.engine import load_model

    run = {"config": label, "plan": plan, "backend": backend if plan is None else None}
    try:
        with PeakMemory() as mem:
            names = {backend} if plan is None else {seg["device"] for seg in plan["segments"]} | {
                plan["embedding"], plan["head"]}
            instances = _backends(sorted(names), s.get("kernel_dirs") or {})
            model = load_model(quant_dir, backend=instances.get(backend, backend), plan=plan, backends=instances)
            run["load_s"] = model.load_seconds
            run["devices"] = list(model.backends)
            run["correctness"] = check_correctness(model, reference, vocab, s["check_tokens"],
                                                   s["check_tokens"] // 2, _tolerance(s, target))
            if not run["correctness"]["passed"]:
                c = run["correctness"]
                run["error"] = (f"correctness check failed: max relative error {c['max_rel_err']:.3g} > "
                                f"{c['tolerance']:.3g} (top-1 agreement {c['top1_agreement']:.2f}); not timed")
                return run
            run["results"] = [time_engine(model, vocab, s["prompt_len"], s["gen_len"], b, s["warmup"], s["repeats"],
                                          progress) for b in s["batches"]]
        run["memory"] = mem.result()
    except LlmoptError as err:
        run["error"] = str(err)
    except Exception as err:  # a backend crashing mid-run is a result to report, not a reason to lose the others
        run["error"] = f"{type(err).__name__}: {err}"
    return run


def _baselines(s, source_dir, target, progress) -> list[dict]:
    from llmopt.bench.baselines import find_gguf, hf_baseline, llama_cpp_baseline

    device = "cuda" if target == "cuda" else "cpu"
    out = []
    for name in s["baselines"]:
        try:
            if name == "hf":
                dtype = "bfloat16" if device == "cuda" and s["hf_dtype"] == "float32" else s["hf_dtype"]
                out.append(hf_baseline(Path(source_dir), s["prompt_len"], s["gen_len"], 1, s["warmup"], s["repeats"],
                                       device, dtype))
            elif name == "llama.cpp":
                gguf = find_gguf(Path(source_dir))
                if gguf is None:
                    out.append({"name": name, "skipped": True, "reason": "no GGUF for this model"})
                    continue
                out.append(llama_cpp_baseline(gguf, s["prompt_len"], s["gen_len"], s["warmup"], s["repeats"], device))
            else:
                raise LlmoptError(f"bench settings: unknown baseline '{name}' (expected hf or llama.cpp)")
        except LlmoptError as err:
            out.append({"name": name, "error": str(err)})
        except Exception as err:
            out.append({"name": name, "error": f"{type(err).__name__}: {err}"})
        if progress is not None:
            progress.update(s["warmup"] + s["repeats"])
    return out


def _summary(rec: dict) -> dict:
    """Headline numbers: batch-1 medians of the first timed configuration, largest-batch aggregate decode."""
    for run in rec.get("runs", []):
        if run.get("results"):
            first, last = run["results"][0], run["results"][-1]
            return {"config": run["config"], "correct": True, "prefill_tok_s": first["prefill_tok_s"]["median"],
                    "decode_tok_s": first["decode_tok_s"]["median"], "ttft_s": first["ttft_s"]["median"],
                    "batch": first["batch"], "max_batch": last["batch"],
                    "aggregate_decode_tok_s": last["decode_tok_s"]["median"],
                    "peak_rss_bytes": (run.get("memory") or {}).get("peak_rss_bytes")}
    errors = [r.get("error") for r in rec.get("runs", []) if r.get("error")]
    return {"correct": not any("correctness" in (e or "") for e in errors), "error": errors[0] if errors else None}


def run_benchmark(quant_dir: Path, source_dir: Path, plan_path: Path, target: str, probe: dict, settings: dict,
                  out: Path) -> dict:
    """Benchmark ``quant_dir`` on ``target`` (and its partition plan); write ``out`` (bench.json) + bench.csv."""
    from tqdm import tqdm

    quant_dir, out = Path(quant_dir), Path(out)
    s = _settings(settings)
    scheme = quant_dir.name if quant_dir.name != "quant" else quant_dir.parent.name
    model_id = quant_dir.parent.parent.name if quant_dir.name == "quant" else quant_dir.name
    rec = {"model": model_id, "scheme": scheme, "target": target, "settings": s, "environment": environment(probe),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "probe": {k: probe.get(k) for k in ("present", "reason", "device", "probed_at")}}
    plan_rec = read_json(plan_path) if plan_path and Path(plan_path).is_file() else {}
    rec["plan_summary"] = {k: plan_rec.get(k) for k in ("solver", "devices", "segments", "embedding", "head",
                                                         "predicted", "single_target", "error", "profile")}
    if not probe.get("present"):
        rec.update({"skipped": True, "reason": f"target {target} absent at probe: {probe.get('reason', '?')}"})
        return _write(rec, out)
    from llmopt.backends import probe as live_probe

    try:
        now = live_probe(target)
    except LlmoptError as err:
        now = {"present": False, "reason": str(err)}
    if not now.get("present"):
        rec.update({"skipped": True, "vanished": True,
                    "reason": f"target {target} was present at probe time but is gone now: {now.get('reason', '?')}"})
        return _write(rec, out)

    from llmopt.backends import get_backend
    from llmopt.engine import load_model

    configs = [("target", target, None)]
    plan = _plan_of(plan_rec)
    if plan is not None and {seg["device"] for seg in plan["segments"]} | {plan["embedding"], plan["head"]} != {target}:
        configs.append(("partition", target, plan))
    per_config = len(s["batches"]) * (s["warmup"] + s["repeats"])
    total = per_config * len(configs) + len(s["baselines"]) * (s["warmup"] + s["repeats"])
    rec["runs"] = []
    with tqdm(total=total, desc=f"bench {model_id}/{scheme}/{target}", unit="run", leave=False) as progress:
        try:
            reference = load_model(quant_dir, backend=get_backend("cpu", quant="reference"))
            vocab = reference.args.vocab_size
        except LlmoptError as err:
            rec.update({"error": f"reference model: {err}"})
            return _write(rec, out)
        for label, backend, p in configs:
            rec["runs"].append(_measure(label, quant_dir, backend, p, reference, vocab, s, target, progress))
        del reference
        rec["baselines"] = _baselines(s, source_dir, target, progress) if source_dir else []
    rec["summary"] = _summary(rec)
    return _write(rec, out)


def _write(rec: dict, out: Path) -> dict:
    write_json(out, rec)
    write_text(out.with_suffix(".csv"), to_csv([rec]))
    return rec


CSV_FIELDS = ["model", "scheme", "target", "config", "engine", "batch", "prompt", "gen", "prefill_tok_s",
              "prefill_spread", "decode_tok_s", "decode_spread", "ttft_s", "peak_rss_bytes", "correct",
              "max_rel_err", "predicted_decode_tok_s", "predicted_prefill_tok_s", "status", "date"]


def rows(rec: dict) -> list[dict]:
    """Flat rows of a bench record: one per configuration and batch, one per baseline, one for a skip/error."""
    base = {k: rec.get(k) for k in ("model", "scheme", "target", "date")}
    if rec.get("skipped") or rec.get("error"):
        return [{**base, "status": ("skipped: " + rec.get("reason", "")) if rec.get("skipped") else rec["error"]}]
    plan = rec.get("plan_summary") or {}
    pred = {"target": plan.get("single_target") or {}, "partition": plan.get("predicted") or {}}
    out = []
    for run in rec.get("runs", []):
        c = run.get("correctness") or {}
        common = {**base, "config": run["config"], "engine": "llmopt", "correct": c.get("passed"),
                  "max_rel_err": c.get("max_rel_err"),
                  "peak_rss_bytes": (run.get("memory") or {}).get("peak_rss_bytes")}
        if run.get("error"):
            out.append({**common, "status": run["error"]})
        for r in run.get("results", []):
            p = pred.get(run["config"], {}) if r["batch"] == 1 else {}
            out.append({**common, "batch": r["batch"], "prompt": r["prompt"], "gen": r["gen"],
                        "prefill_tok_s": r["prefill_tok_s"]["median"], "prefill_spread": r["prefill_tok_s"]["spread"],
                        "decode_tok_s": r["decode_tok_s"]["median"], "decode_spread": r["decode_tok_s"]["spread"],
                        "ttft_s": r["ttft_s"]["median"], "predicted_decode_tok_s": p.get("decode_tok_s"),
                        "predicted_prefill_tok_s": p.get("prefill_tok_s"), "status": "ok"})
    for b in rec.get("baselines", []):
        row = {**base, "config": "baseline", "engine": b.get("engine", b["name"])}
        if "decode_tok_s" in b:
            row.update({"batch": b["batch"], "prompt": b["prompt"], "gen": b["gen"],
                        "prefill_tok_s": b["prefill_tok_s"]["median"], "prefill_spread": b["prefill_tok_s"]["spread"],
                        "decode_tok_s": b["decode_tok_s"]["median"], "decode_spread": b["decode_tok_s"]["spread"],
                        "ttft_s": b["ttft_s"]["median"], "status": "ok"})
        else:
            row["status"] = ("skipped: " + b.get("reason", "")) if b.get("skipped") else b.get("error")
        out.append(row)
    return out


def to_csv(records: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for rec in records:
        writer.writerows(rows(rec))
    return buf.getvalue()
