"""The report: everything the stages wrote under ``results/``, as one self-contained page and its Markdown twin.

``build_report(results_dir, config, out_dir)`` reads probes (``targets/*.json``), source manifests, ``quant.json``
files, ``partition.json`` and ``bench.json`` files and ``calibration.json``, and writes into ``out_dir``:
``index.html`` (images inlined as base64, no external assets), ``report.md`` (figures referenced from
``figures/``), ``summary.csv`` and ``figures/*.png``. Per model: size before/after, compression, quality, tok/s
per target with baselines, the seed's target, the physical ceiling and the percentage reached; plots; environment
and provenance. An unreadable file, an absent target or a failed stage becomes a row in "Errors and skips",
never a crash.

    llmopt report results --out results/report
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from llmopt.errors import LlmoptError
from llmopt.fsutil import atomic_path, read_json
from llmopt.report import figures
from llmopt.report.render import render_html, render_markdown
from llmopt.report.sections import report_sections

GB = 1e9


def _load(path: Path, problems: list) -> dict | None:
    try:
        data = read_json(path)
    except LlmoptError as err:
        problems.append({"where": str(path), "what": str(err)})
        return None
    if not isinstance(data, dict):
        problems.append({"where": str(path), "what": "expected a JSON object"})
        return None
    return data


def _load_if(path: Path, problems: list) -> dict | None:
    return _load(path, problems) if path.is_file() else None


def _st_bytes(folder: Path) -> int | None:
    files = list(folder.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def collect(results_dir: Path, config: dict) -> dict:
    """Every record under ``results_dir`` in flat tables, plus the problems met while reading them."""
    problems: list[dict] = []
    probes = {}
    for p in sorted((results_dir / "targets").glob("*.json")):
        if p.stem == "calibration":
            continue
        rec = _load(p, problems)
        if rec is not None:
            probes[rec.get("target", p.stem)] = rec
    models = (config or {}).get("models") or {}
    sizes, speed, laptop, plans, skips, benches = [], [], [], [], [], []
    for model_dir in sorted(d for d in results_dir.iterdir() if d.is_dir() and d.name not in ("targets", "report",
                                                                                            "kernels")):
        entry = models.get(model_dir.name, {})
        source = model_dir / "source"
        manifest = _load_if(source / "manifest.json", problems)
        before = _st_bytes(source) if source.is_dir() else None
        for scheme_dir in sorted(d for d in model_dir.iterdir() if d.is_dir() and d.name != "source"):
            quant = scheme_dir / "quant"
            qjson = _load_if(quant / "quant.json", problems)
            after = _st_bytes(quant) if quant.is_dir() else None
            if qjson is not None or after is not None:
                sizes.append(_size_row(model_dir.name, scheme_dir.name, entry, manifest, qjson, before, after, quant))
            for target_dir in sorted(d for d in scheme_dir.iterdir() if d.is_dir() and d.name != "quant"):
                part = _load_if(target_dir / "partition.json", problems)
                bench = _load_if(target_dir / "bench.json", problems)
                key = {"model": model_dir.name, "scheme": scheme_dir.name, "target": target_dir.name}
                if part is not None:
                    plans.append({**key, "record": part, "diagram": target_dir / "partition.png"})
                    _note(skips, key, "partition", part)
                    if part.get("laptop") and not any(r["model"] == key["model"] and r["scheme"] == key["scheme"]
                                                      for r in laptop):
                        laptop.append(_laptop_row(key, part["laptop"], entry))
                if bench is not None:
                    benches.append(bench)
                    _note(skips, key, "benchmark", bench)
                    speed.extend(_speed_rows(key, bench, part))
    calibration = None
    for path in (results_dir / "targets" / "calibration.json", results_dir / "calibration.json"):
        if path.is_file():
            calibration = _load(path, problems)
            break
    return {"probes": probes, "sizes": sizes, "speed": speed, "laptop": laptop, "plans": plans, "skips": skips,
            "problems": problems, "benches": benches, "calibration": calibration, "models": models}


def _note(skips: list, key: dict, stage: str, rec: dict) -> None:
    if rec.get("skipped"):
        skips.append({**key, "stage": stage, "kind": "vanished" if rec.get("vanished") else "skipped",
                      "reason": rec.get("reason", "")})
    if rec.get("error"):
        skips.append({**key, "stage": stage, "kind": "error", "reason": rec["error"]})
    for run in rec.get("runs", []) or []:
        if run.get("error"):
            skips.append({**key, "stage": f"benchmark ({run.get('config')})", "kind": "error", "reason": run["error"]})
    for b in rec.get("baselines", []) or []:
        if b.get("error") or b.get("skipped"):
            skips.append({**key, "stage": f"baseline {b.get('name')}", "kind": "error" if b.get("error") else "skipped",
                          "reason": b.get("error") or b.get("reason", "")})
    laptop = rec.get("laptop") or {}
    if laptop.get("error"):
        skips.append({**key, "stage": "laptop plan", "kind": "error", "reason": laptop["error"]})
    for prof in ("phoenix-ddr5", "phoenix-lpddr5x"):
        if (laptop.get(prof) or {}).get("error"):
            skips.append({**key, "stage": f"laptop plan {prof}", "kind": "infeasible", "reason": laptop[prof]["error"]})


def _size_row(model, scheme, entry, manifest, qjson, before, after, quant_dir) -> dict:
    """Sizes from quant.json (``orig_bytes``, ``bytes``, ``quantized_bits_per_weight``; llmopt.quant.pipeline) or,
    lacking it, from the folders' safetensors; perplexity of the first evaluation text, float and quantized."""
    q = qjson or {}
    seed = entry.get("seed") or {}
    before = q.get("orig_bytes") or before
    after = q.get("bytes") or after
    bpw = q.get("quantized_bits_per_weight") or q.get("bits_per_weight")
    ppl = q.get("perplexity") or {}
    text = next(iter(ppl.get("quant") or {}), None)
    row = {"model": model, "scheme": scheme, "scale": (manifest or {}).get("scale"),
           "source": (manifest or {}).get("source"), "size_before_gb": before / GB if before else None,
           "size_after_gb": after / GB if after else None,
           "compression": before / after if before and after else None, "bpw": bpw,
           "bpw_all": q.get("bits_per_weight"), "ppl_text": text, "ppl": (ppl.get("quant") or {}).get(text),
           "ppl_float": (ppl.get("float") or {}).get(text), "ppl_note": ppl.get("skipped"),
           "seed_size_gb": seed.get("size_gb"), "seed_original_gb": seed.get("original_size_gb")}
    if entry.get("architecture") and bpw:
        from llmopt.analysis import Arch, Precision, analyze

        try:
            an = analyze(Arch.from_entry(entry, model), Precision(linear_bpw=bpw))
            row.update({"full_params_b": an.params / 1e9, "full_bf16_gb": analyze(an.arch).weight_bytes / GB,
                        "full_at_bpw_gb": an.weight_bytes / GB})
        except LlmoptError:
            pass
    return row


def _speed_rows(key: dict, bench: dict, part: dict | None) -> list[dict]:
    if bench.get("skipped") or bench.get("error"):
        return []
    part = part or {}
    base = {}
    for b in bench.get("baselines", []) or []:
        if "decode_tok_s" in b:
            name = "hf" if b["name"] == "hf" else "llama_cpp"
            base[f"{name}_decode_tok_s"] = b["decode_tok_s"]["median"]
            base[f"{name}_prefill_tok_s"] = b["prefill_tok_s"]["median"]
    out = []
    for run in bench.get("runs", []):
        if not run.get("results"):
            continue
        pred = (part.get("single_target") if run["config"] == "target" else part.get("predicted")) or {}
        first, last = run["results"][0], run["results"][-1]
        dec = first["decode_tok_s"]["median"]
        ceiling = pred.get("ceiling_decode_tok_s")
        devices = "+".join(run.get("devices") or [key["target"]])
        out.append({**key, "config": run["config"], "devices": devices, "decode_tok_s": dec,
                    "decode_spread": first["decode_tok_s"]["spread"], "prefill_tok_s": first["prefill_tok_s"]["median"],
                    "ttft_s": first["ttft_s"]["median"], "max_batch": last["batch"],
                    "aggregate_decode_tok_s": last["decode_tok_s"]["median"],
                    "peak_rss_gb": ((run.get("memory") or {}).get("peak_rss_bytes") or 0) / GB or None,
                    "max_rel_err": (run.get("correctness") or {}).get("max_rel_err"),
                    "predicted_decode_tok_s": pred.get("decode_tok_s"),
                    "predicted_prefill_tok_s": pred.get("prefill_tok_s"), "ceiling_decode_tok_s": ceiling,
                    "pct_of_ceiling": 100.0 * dec / ceiling if ceiling else None, **base,
                    "vs_hf": dec / base["hf_decode_tok_s"] if base.get("hf_decode_tok_s") else None,
                    "vs_llama_cpp": (dec / base["llama_cpp_decode_tok_s"]) if base.get("llama_cpp_decode_tok_s")
                    else None})
    return out


def _laptop_row(key: dict, lap: dict, entry: dict) -> dict:
    seed = (entry.get("seed") or lap.get("seed") or {})
    lo, hi = (seed.get("tok_s") or [None, None])[:2]
    row = {"model": key["model"], "scheme": key["scheme"], "seed_lo": lo, "seed_hi": hi,
           "full_size_gb": (lap.get("weight_bytes") or 0) / GB or None}
    for prof, tag in (("phoenix-ddr5", ""), ("phoenix-lpddr5x", "lpddr5x_")):
        p = lap.get(prof) or {}
        pred = p.get("predicted") or {}
        heur = p.get("heuristic") or {}
        sweep = p.get("batch_sweep") or {}
        row[f"{tag}decode_tok_s"] = pred.get("decode_tok_s")
        row[f"{tag}ceiling_decode_tok_s"] = pred.get("ceiling_decode_tok_s")
        if not tag:
            row["plan"] = ", ".join(f"{s['layers'][0]}-{s['layers'][1]}:{s['device']}" for s in p.get("segments", []))
            row["heuristic_decode_tok_s"] = (heur.get("predicted") or {}).get("decode_tok_s")
            row["heuristic_feasible"] = heur.get("feasible")
            row["prefill_tok_s"] = pred.get("prefill_tok_s")
            row["batch16_tok_s"] = sweep.get("16") or sweep.get(16)
            row["batch_for_seed"] = next((int(b) for b, v in sorted(sweep.items(), key=lambda kv: int(kv[0]))
                                          if lo and v >= lo), None)
            row["error"] = p.get("error")
    if lo and row.get("ceiling_decode_tok_s"):
        row["ceiling_pct_of_seed"] = 100.0 * row["ceiling_decode_tok_s"] / lo
    return row


SUMMARY_FIELDS = ["model", "scheme", "target", "config", "devices", "decode_tok_s", "decode_spread", "prefill_tok_s",
                  "ttft_s", "max_batch", "aggregate_decode_tok_s", "peak_rss_gb", "max_rel_err",
                  "predicted_decode_tok_s", "predicted_prefill_tok_s", "ceiling_decode_tok_s", "pct_of_ceiling",
                  "hf_decode_tok_s", "llama_cpp_decode_tok_s", "vs_hf", "vs_llama_cpp", "size_before_gb",
                  "size_after_gb", "compression", "bpw", "ppl", "seed_lo", "seed_hi", "laptop_decode_tok_s",
                  "laptop_ceiling_decode_tok_s"]


def summary_rows(data: dict) -> list[dict]:
    """One row per measured configuration, with the model's size/quality and the laptop prediction beside it."""
    sizes = {(r["model"], r["scheme"]): r for r in data["sizes"]}
    lap = {(r["model"], r["scheme"]): r for r in data["laptop"]}
    out = []
    for r in data["speed"]:
        s, lp = sizes.get((r["model"], r["scheme"]), {}), lap.get((r["model"], r["scheme"]), {})
        out.append({**r, **{k: s.get(k) for k in ("size_before_gb", "size_after_gb", "compression", "bpw", "ppl")},
                    "seed_lo": lp.get("seed_lo"), "seed_hi": lp.get("seed_hi"),
                    "laptop_decode_tok_s": lp.get("decode_tok_s"),
                    "laptop_ceiling_decode_tok_s": lp.get("ceiling_decode_tok_s")})
    return out


def _model_entries(config: dict) -> dict:
    """Registry entries by id: the config's own mapping if it holds one, else the registry it names."""
    if isinstance(config.get("models"), dict):
        return config["models"]
    from llmopt import registry

    try:
        return registry.load(config or None).all_models
    except LlmoptError:
        return {}


def build_report(results_dir: Path, config: dict, out_dir: Path) -> None:
    """Write index.html, report.md, summary.csv and figures/ for everything under ``results_dir``."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    if not results_dir.is_dir():
        raise LlmoptError(f"{results_dir}: results folder not found")
    data = collect(results_dir, {**(config or {}), "models": _model_entries(config or {})})
    with atomic_path(out_dir) as tmp:
        figdir = tmp / "figures"
        figdir.mkdir(parents=True)
        figs = {
            "seed_vs_ceiling": figures.seed_vs_ceiling(data["laptop"], figdir / "seed_vs_ceiling.png"),
            "measured_vs_ceiling": figures.measured_vs_ceiling(data["speed"], figdir / "measured_vs_ceiling.png"),
            "perplexity_vs_bpw": figures.perplexity_vs_bpw(data["sizes"], figdir / "perplexity_vs_bpw.png"),
            "predicted_vs_measured": figures.predicted_vs_measured(data["speed"], figdir / "predicted_vs_measured.png"),
        }
        diagrams = []
        for p in data["plans"]:
            if p["diagram"].is_file():
                name = f"partition_{p['model']}_{p['scheme']}_{p['target']}.png"
                (figdir / name).write_bytes(p["diagram"].read_bytes())
                diagrams.append((f"{p['model']} / {p['scheme']} / {p['target']}", figdir / name))
        sections = report_sections(data, figs, diagrams)
        (tmp / "index.html").write_text(render_html(sections, "llmopt report"))
        (tmp / "report.md").write_text(render_markdown(sections, "llmopt report", tmp))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summary_rows(data))
        (tmp / "summary.csv").write_text(buf.getvalue())
        (tmp / "data.json").write_text(json.dumps({k: data[k] for k in ("sizes", "speed", "laptop", "skips",
                                                                         "problems")}, indent=1, default=str))
