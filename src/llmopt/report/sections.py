"""The report's content: which tables, figures and explanations appear, in order.

A table column is ``(row key, header, format spec or None)``, or just the key where the header is the key itself and
the value is shown as it is (``render.Table``).
"""

from __future__ import annotations

from llmopt.report.render import Section, Table


def report_sections(data: dict, figs: dict, diagrams: list) -> list[Section]:
    return [_overview(data), _targets(data), _sizes(data, figs), _speed(data, figs), _seed(data, figs),
            _partitions(data, diagrams), _problems(data), _environment(data)]


def _overview(data: dict) -> Section:
    return Section("Overview", [
        f"{len(data['sizes'])} quantized model folders, {len(data['plans'])} partition plans, "
        f"{len(data['benches'])} benchmark records ({len(data['speed'])} timed configurations), "
        f"{len(data['skips'])} skips/errors, {len(data['problems'])} unreadable files.",
        "Every speed here was measured after a correctness check against the CPU reference backend (float32 ops on "
        "the dequantized packed weights); a configuration failing it is listed under Errors and not timed. "
        "Ceilings are physical: tokens/s <= bandwidth / bytes read per token (decode) and FLOP/s / FLOPs per token "
        "(prefill), from ceilings measured on this machine (bench/calibrate.py) or stated for the Phoenix laptop "
        "(../shared/reference/FACTS.md §3)."])


def _targets(data: dict) -> Section:
    rows = [{"target": t, "present": p.get("present"), "device": str((p.get("device") or {}).get("name", "")),
             "reason": p.get("reason"), "probed_at": p.get("probed_at"), "cls": None if p.get("present") else "skip"}
            for t, p in sorted(data["probes"].items())]
    return Section("Targets", tables=[Table(["target", "present", "device", "reason", ("probed_at", "probed", None)],
                                            rows, "cls")])


def _sizes(data: dict, figs: dict) -> Section:
    return Section("Size and quality", [
        "Before / after = bytes of the source and packed weights at the scale built here (tiny / real; quant.json). "
        "bpw linears = bits per weight of the quantized tensors, scales included; bpw all = every tensor. "
        "Perplexity on the quantization stage's held-out text (real weights only). Full-scale columns apply the "
        "scheme's bpw to the real architecture (llmopt.analysis) beside the seed's size target."], tables=[Table([
            "model", "scheme", "scale", ("size_before_gb", "before GB", ".4f"), ("size_after_gb", "after GB", ".4f"),
            ("compression", "x", ".2f"), ("bpw", "bpw linears", ".2f"), ("bpw_all", "bpw all", ".2f"),
            ("ppl_text", "ppl text", None), ("ppl", "ppl", ".2f"), ("ppl_float", "ppl float", ".2f"),
            ("ppl_note", "ppl note", None), ("full_params_b", "full params B", ".2f"),
            ("full_bf16_gb", "full bf16 GB", ".1f"), ("full_at_bpw_gb", "full at bpw GB", ".2f"),
            ("seed_original_gb", "seed before GB", None), ("seed_size_gb", "seed after GB", None)], data["sizes"])],
        figures=[("Perplexity against bits per weight", figs["perplexity_vs_bpw"])])


def _speed(data: dict, figs: dict) -> Section:
    return Section("Speed on this machine", [
        "Batch 1 unless noted; medians of the timed repeats (spread = (max - min) / median). 'target' runs the whole "
        "model on the target's backend, 'partition' the partition plan. Predicted and ceiling come from the roofline "
        "with the ceilings calibrated here; % = measured / ceiling. Baselines ran in the same process with the same "
        "prompt and decode lengths."], tables=[Table([
            "model", "scheme", "target", "config", "devices", ("decode_tok_s", "decode tok/s", ".1f"),
            ("decode_spread", "spread", ".2f"),
            ("prefill_tok_s", "prefill tok/s", ".1f"), ("ttft_s", "TTFT s", ".3f"),
            ("aggregate_decode_tok_s", "decode at max batch", ".1f"), ("max_batch", "max batch", None),
            ("peak_rss_gb", "peak RSS GB", ".2f"), ("max_rel_err", "check rel err", ".1e"),
            ("predicted_decode_tok_s", "predicted decode", ".1f"), ("ceiling_decode_tok_s", "ceiling decode", ".1f"),
            ("pct_of_ceiling", "% ceiling", ".1f"), ("hf_decode_tok_s", "HF decode", ".1f"),
            ("llama_cpp_decode_tok_s", "llama.cpp decode", ".1f"), ("vs_hf", "x HF", ".2f"),
            ("vs_llama_cpp", "x llama.cpp", ".2f")], data["speed"])],
        figures=[("Measured decode tok/s against the ceiling here and the baselines", figs["measured_vs_ceiling"]),
                 ("Roofline prediction against measurement", figs["predicted_vs_measured"])])


def _seed(data: dict, figs: dict) -> Section:
    rows = [{**r, "cls": "bad" if r.get("error") else None} for r in data["laptop"]]
    return Section("The seed's targets on the Phoenix laptop (full scale)", [
        "Full-scale architectures at each scheme's measured bpw, costed on the Phoenix laptop profile (XDNA1 NPU "
        "2 GB budget, Radeon 780M 16 GB budget, Zen 4 CPU, one shared DRAM). 'plan' is the exact (ILP) optimum, "
        "'heuristic' the seed's NPU-coverage rule. Batch-1 decode is bounded by DRAM bandwidth / bytes per token, "
        "so the seed's tokens/s are reachable only as aggregate throughput over a batch ('batch for seed' = the "
        "smallest batch whose predicted aggregate reaches the seed's lower target; memory budgets checked at "
        "batch 1)."], tables=[Table([
            "model", "scheme", ("full_size_gb", "size GB", ".2f"), ("seed_lo", "seed low", None),
            ("seed_hi", "seed high", None), ("ceiling_decode_tok_s", "ceiling DDR5", ".1f"),
            ("lpddr5x_ceiling_decode_tok_s", "ceiling LPDDR5x", ".1f"),
            ("ceiling_pct_of_seed", "ceiling % of seed", ".0f"), ("decode_tok_s", "plan DDR5", ".1f"),
            ("lpddr5x_decode_tok_s", "plan LPDDR5x", ".1f"), ("heuristic_decode_tok_s", "heuristic DDR5", ".1f"),
            ("heuristic_feasible", "heuristic fits", None), ("prefill_tok_s", "prefill DDR5", ".0f"),
            ("batch16_tok_s", "batch 16 aggregate", ".0f"), ("batch_for_seed", "batch for seed", None),
            ("plan", "plan (layers:device)", None), "error"], rows, "cls")],
        figures=[("Seed target range, physical ceiling and predictions", figs["seed_vs_ceiling"])])


def _partitions(data: dict, diagrams: list) -> Section:
    rows = []
    for p in data["plans"]:
        r = p["record"]
        pred, heur = r.get("predicted") or {}, (r.get("heuristic") or {})
        rows.append({"model": p["model"], "scheme": p["scheme"], "target": p["target"],
                     "devices": "+".join(r.get("devices") or []),
                     "plan": ", ".join(f"{g['layers'][0]}-{g['layers'][1]}:{g['device']}"
                                       for g in r.get("segments", [])),
                     "embedding": r.get("embedding"), "head": r.get("head"),
                     "decode": pred.get("decode_tok_s"), "heuristic": (heur.get("predicted") or {}).get("decode_tok_s"),
                     "rule": heur.get("rule"), "status": r.get("reason") or r.get("error") or "ok",
                     "cls": "bad" if r.get("error") else "skip" if r.get("skipped") else None})
    return Section("Partition plans", [
        "Plans for the devices present here, costed with the calibrated roofline; the diagrams also show the "
        "full-scale Phoenix laptop plans and the seed heuristic."], tables=[Table([
            "model", "scheme", "target", "devices", ("plan", "layers:device", None), "embedding", "head",
            ("decode", "predicted decode tok/s", ".1f"), ("heuristic", "heuristic tok/s", ".1f"),
            ("rule", "heuristic rule", None), "status"], rows, "cls")],
        figures=[(f"Partition: {label}", path) for label, path in diagrams])


def _problems(data: dict) -> Section:
    skips = [{**r, "cls": "bad" if r["kind"] in ("error", "infeasible", "vanished") else "skip"} for r in data["skips"]]
    return Section("Errors and skips", [
        "Every absent target, vanished device, failed correctness check, infeasible budget, failed stage and "
        "unreadable file, with its reason."],
        tables=[Table(["model", "scheme", "target", "stage", "kind", "reason"], skips, "cls"),
                Table([("where", "file", None), ("what", "problem", None)], data["problems"])])


def _environment(data: dict) -> Section:
    env = next((b.get("environment") for b in data["benches"] if b.get("environment")), None) or {}
    rows = [{"key": k, "value": str(v)} for k, v in env.items() if k not in ("packages", "target_features")]
    rows += [{"key": f"package {k}", "value": str(v)} for k, v in (env.get("packages") or {}).items()]
    s = Section("Environment and provenance", tables=[Table([("key", "", None), ("value", "", None)], rows)])
    cal = data.get("calibration")
    if cal:
        crow = [{"target": t, "gemv": (c.get("int4_gemv_bytes_s") or 0) / 1e9 or None,
                 "gemm": (c.get("gemm_flops_s") or 0) / 1e9 or None,
                 "op_us": (c.get("op_overhead_s") or 0) * 1e6 or None, "error": c.get("error")}
                for t, c in (cal.get("backends") or {}).items()]
        host = cal.get("host") or {}
        s.paragraphs.append(f"Calibration {cal.get('date')}: host copy bandwidth "
                            f"{(host.get('bandwidth') or 0) / 1e9:.2f} GB/s, float32 matmul "
                            f"{(host.get('matmul_float32') or 0) / 1e9:.1f} GFLOP/s, bf16 matmul "
                            f"{(host.get('matmul_bfloat16') or 0) / 1e9:.1f} GFLOP/s.")
        s.tables.append(Table(["target", ("gemv", "int4 GEMV GB/s", ".3f"), ("gemm", "int4 GEMM GFLOP/s", ".2f"),
                               ("op_us", "tiny op us", ".1f"), "error"], crow))
    prov = [{"model": r["model"], "scheme": r["scheme"], "source": r.get("source"), "scale": r.get("scale")}
            for r in data["sizes"]]
    s.tables.append(Table(["model", "scheme", ("source", "weights from", None), "scale"], prov))
    return s
