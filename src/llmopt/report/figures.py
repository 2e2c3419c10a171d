"""The report's plots (matplotlib, Agg): each function takes the collected tables and writes one PNG.

A plot with nothing to show still renders (a labelled empty frame saying why), so the page never has a hole.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llmopt.fsutil import atomic_path  # noqa: E402

TARGET_COLORS = {"cpu": "#4c72b0", "vulkan": "#dd8452", "npu": "#55a868", "cuda": "#c44e52", "iree-cpu": "#8172b3",
                 "hf": "#937860", "llama.cpp": "#da8bc3"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def _empty(ax, why: str) -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="#555")
    ax.set_xticks([])
    ax.set_yticks([])


def seed_vs_ceiling(laptop: list[dict], path: Path) -> Path:
    """Full-scale models on the Phoenix laptop: the seed's target range, the physical ceiling, our predicted
    batch-1 decode (optimal plan) and the aggregate at batch 16, log scale."""
    fig, ax = plt.subplots(figsize=(12, 5))
    rows = [r for r in laptop if r.get("decode_tok_s")]
    if not rows:
        _empty(ax, "no laptop predictions (partition.json files missing)")
        return _save(fig, path)
    xs = range(len(rows))
    for x, r in zip(xs, rows):
        if r.get("seed_lo"):
            ax.add_patch(plt.Rectangle((x - 0.4, r["seed_lo"]), 0.8, r["seed_hi"] - r["seed_lo"], color="#f2c14e",
                                       alpha=0.6, label="seed target" if x == 0 else None))
    ax.scatter(xs, [r["ceiling_decode_tok_s"] for r in rows], marker="_", s=400, color="black", linewidths=2,
               label="physical ceiling, batch 1 (DDR5-5600)", zorder=3)
    ax.scatter(xs, [r["decode_tok_s"] for r in rows], color="#55a868", s=50, zorder=4,
               label="predicted, optimal plan, batch 1")
    ax.scatter(xs, [r.get("heuristic_decode_tok_s") or math.nan for r in rows], color="#c44e52", marker="x", s=50,
               zorder=4, label="predicted, seed heuristic, batch 1")
    ax.scatter(xs, [r.get("batch16_tok_s") or math.nan for r in rows], color="#4c72b0", marker="^", s=50, zorder=4,
               label="predicted aggregate, batch 16")
    ax.set_xticks(list(xs), [f"{r['model']}\n{r['scheme']}" for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Seed targets vs physics: Phoenix laptop (NPU + Radeon 780M + Zen 4, DDR5-5600), full-scale models",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", which="both", alpha=0.3)
    return _save(fig, path)


def measured_vs_ceiling(speed: list[dict], path: Path) -> Path:
    """Measured batch-1 decode here per model/scheme/target, beside the measured ceiling and the baselines."""
    fig, ax = plt.subplots(figsize=(10, 4.8))
    rows = [r for r in speed if r.get("decode_tok_s")]
    if not rows:
        _empty(ax, "no benchmark results yet")
        return _save(fig, path)
    xs = list(range(len(rows)))
    ax.bar(xs, [r["decode_tok_s"] for r in rows], color=[TARGET_COLORS.get(r["target"], "grey") for r in rows],
           label="measured (llmopt)")
    ax.scatter(xs, [r.get("ceiling_decode_tok_s") or math.nan for r in rows], marker="_", s=500, color="black",
               linewidths=2, label="ceiling here (bandwidth / bytes per token)", zorder=3)
    ax.scatter(xs, [r.get("hf_decode_tok_s") or math.nan for r in rows], marker="o", color=TARGET_COLORS["hf"],
               label="HF transformers float", zorder=4)
    ax.scatter(xs, [r.get("llama_cpp_decode_tok_s") or math.nan for r in rows], marker="D",
               color=TARGET_COLORS["llama.cpp"], label="llama.cpp (GGUF)", zorder=4)
    ax.set_xticks(xs, [f"{r['model']}/{r['scheme']}/{r['target']}" for r in rows], rotation=60, ha="right", fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s, batch 1")
    ax.set_title("Measured on this machine, against its ceiling and the baselines")
    ax.legend(fontsize=7)
    ax.grid(axis="y", which="both", alpha=0.3)
    return _save(fig, path)


def perplexity_vs_bpw(quality: list[dict], path: Path) -> Path:
    """Perplexity against bits per weight, one line per model (float reference at its bpw)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in quality if r.get("ppl") and r.get("bpw")]
    if not rows:
        _empty(ax, "no perplexity in quant.json files")
        return _save(fig, path)
    for model in sorted({r["model"] for r in rows}):
        pts = sorted({(r["bpw"], r["ppl"], r["scheme"]) for r in rows if r["model"] == model}
                     | {(16.0, r["ppl_float"], "float") for r in rows if r["model"] == model and r.get("ppl_float")})
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=model)
        for b, p, s in pts:
            ax.annotate(s, (b, p), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("bits per weight (decoder linears, scales included)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title("Quality against size")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def predicted_vs_measured(speed: list[dict], path: Path) -> Path:
    """Roofline prediction (measured ceilings here) against the measurement, decode and prefill, log-log."""
    fig, ax = plt.subplots(figsize=(6, 5))
    pts = [(r["predicted_decode_tok_s"], r["decode_tok_s"], "decode", r["target"]) for r in speed
           if r.get("predicted_decode_tok_s") and r.get("decode_tok_s")]
    pts += [(r["predicted_prefill_tok_s"], r["prefill_tok_s"], "prefill", r["target"]) for r in speed
            if r.get("predicted_prefill_tok_s") and r.get("prefill_tok_s")]
    if not pts:
        _empty(ax, "no predictions beside measurements yet")
        return _save(fig, path)
    for phase, marker in (("decode", "o"), ("prefill", "s")):
        sel = [p for p in pts if p[2] == phase]
        ax.scatter([p[0] for p in sel], [p[1] for p in sel], marker=marker,
                   c=[TARGET_COLORS.get(p[3], "grey") for p in sel], label=phase, alpha=0.8)
    lo = min(min(p[0], p[1]) for p in pts) / 2
    hi = max(max(p[0], p[1]) for p in pts) * 2
    ax.plot([lo, hi], [lo, hi], color="black", lw=1, label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted tokens/s (roofline, calibrated here)")
    ax.set_ylabel("measured tokens/s")
    ax.set_title("Predicted against measured (colour = target)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)
