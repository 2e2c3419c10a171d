"""Perplexity against bits per weight for every quantization scheme on the real Gemma 3 270M.

Quantizes the reference model (``llmopt.download.pip_gguf.ensure_reference_model``) with each scheme through the
real stage entry (``quantize_model``), which evaluates float and fake-quantized perplexity on held-out text
(Hamlet; Pride and Prejudice with ``--text``), then merges llama.cpp's anchors (``bench/quant_llamacpp.py`` output,
if present) and writes a table (Markdown + CSV) and a plot of perplexity against bits per weight.

    .venv/bin/python bench/quant_quality.py --out bench/out/quant [--scheme w4g128 ...] [--text hamlet]
        [--gptq damp=0.03]   # GPTQ options for the gptq schemes; their rows get the options as a suffix
        [--tune steps=100]   # end-to-end tuning options, for schemes with `tune` (or every scheme: --tune on)
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

from llmopt.download.pip_gguf import ensure_reference_model
from llmopt.errors import LlmoptError
from llmopt.fsutil import write_text
from llmopt.quant.pipeline import quantize_model
from llmopt.quant.schemes import PRESETS

DEFAULT_SCHEMES = ["w8", "w8g32", "mixed-gptq-7.36", "mixed-7.36", "w4g128-gptq-emb8", "w4g32", "w4g32-gptq",
                   "w4g128", "w4g128-gptq", "w4g128-mse", "mixed-4.5", "w3g64", "mixed-3.5", "w3g64-gptq", "w2g32",
                   "seed-size"]
MIXED_OPTIONS = [{"bits": 2, "group": 64, "sym": False}, {"bits": 3, "group": 64, "sym": False},
                 {"bits": 4, "group": 64, "sym": False}, {"bits": 4, "group": 32, "sym": False},
                 {"bits": 5, "group": 32, "sym": True},
                 {"bits": 6, "group": 64, "sym": True}, {"bits": 8, "group": 0, "sym": True}]


def scheme_of(name: str, texts: list[str], tokens: int, calibration_tokens: int, gptq: dict | None = None,
              tune: dict | None = None, calibration_texts: list[str] | None = None) -> dict:
    """A preset, ``mixed-<bpw>`` (options ``MIXED_OPTIONS``, mse) or ``mixed-gptq-<bpw>`` (the same options by GPTQ,
    vocabulary tables fixed at int8 g32, llama.cpp Q8_0's layout, as its 4-bit types keep them), evaluated on
    ``texts``; ``gptq`` options go to GPTQ schemes, ``tune`` options to schemes with ``tune`` (``{"on": ...}`` adds
    tuning to any quantized scheme); ``calibration_texts`` replace the default calibration plays."""
    calibration = {"tokens": calibration_tokens, **({"texts": calibration_texts} if calibration_texts else {})}
    common = {"perplexity": {"texts": texts, "tokens": tokens}, "calibration": calibration}
    scheme = _scheme_of(name, common)
    if gptq and (scheme["method"] == "gptq" or scheme.get("base") == "gptq"):
        scheme["gptq"] = gptq
    if tune and ("tune" in scheme or "on" in tune):
        scheme["tune"] = {**(scheme.get("tune") or {}), **{k: v for k, v in tune.items() if k != "on"}}
    return scheme


def _scheme_of(name: str, common: dict) -> dict:
    if name.startswith("mixed-gptq-"):
        return {"name": name, "method": "mixed", "budget": {"bpw": float(name.split("-")[2])}, "base": "gptq",
                "embedding": {"bits": 8, "group": 32}, "options": MIXED_OPTIONS, **common}
    if name.startswith("mixed-"):
        return {"name": name, "method": "mixed", "budget": {"bpw": float(name.split("-")[1])},
                "options": MIXED_OPTIONS, **common}
    if name not in PRESETS:
        raise LlmoptError(f"--scheme {name}: not a preset ({', '.join(PRESETS)}) or mixed-<bpw>")
    return {"name": name, **PRESETS[name], **common}


def seed_entry(model_id: str) -> dict:
    """The model entry whose seed size ``seed-size`` applies (as bits per weight): the 270M has no seed target of
    its own, so by default it gets its family's, Gemma 3 27B's 8 GB (2.37 bpw, FACTS §1)."""
    from llmopt.registry import load_models

    entry = load_models(Path(__file__).resolve().parents[1] / "config" / "models.yaml").get(model_id)
    if not entry or not entry.get("seed"):
        raise LlmoptError(f"--seed-of {model_id}: no model entry with a seed size in config/models.yaml")
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/out/quant"), help="output folder (table, plot, quant.json copies)")
    p.add_argument("--scheme", action="append", help=f"scheme (preset, mixed-<bpw> or mixed-gptq-<bpw>); default {DEFAULT_SCHEMES}")
    p.add_argument("--text", action="append", help="evaluation text (default hamlet)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per text (default 4096)")
    p.add_argument("--calibration-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--calibration-text", action="append", metavar="NAME",
                   help="calibration text, a play or an Austen novel (repeat; default the 8 plays of "
                        "llmopt.quant.texts.CALIBRATION_PLAYS); must not be an evaluation text")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine 2 threads stall each other)")
    p.add_argument("--seed-of", default="gemma-3-27b-it",
                   help="model entry whose seed size (as bits per weight) the seed-size scheme gets (default gemma-3-27b-it)")
    p.add_argument("--gptq", action="append", default=[], metavar="KEY=VALUE",
                   help="GPTQ option for every gptq scheme (damp=<fraction>, table_damp=<fraction>: the schemes' `gptq` "
                        "key, replacing a preset's); rows are then named SCHEME[KEY=VALUE,...]")
    p.add_argument("--tune", action="append", default=[], metavar="KEY=VALUE",
                   help="end-to-end tuning option (steps=, lr=, tokens=, topk=, params=all|layers|table, "
                        "windows=calibration|fresh, round_lr= (learned rounding); `norms` trains the 1-D float weights too; `on` adds tuning with "
                        "defaults to every quantized scheme) for schemes with `tune`; rows are then named "
                        "SCHEME[KEY=VALUE,...]")
    p.add_argument("--redo", action="store_true", help="recompute schemes already in OUT/results.json")
    p.add_argument("--keep", action="store_true", help="keep the quantized model folders under OUT/models")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    source = ensure_reference_model()
    texts = args.text or ["hamlet"]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = _load_rows(args.out / "results.json")
    gptq = _gptq_options(args.gptq)
    tune = _tune_options(args.tune)
    for scheme_name in args.scheme or DEFAULT_SCHEMES:
        scheme = scheme_of(scheme_name, texts, args.tokens, args.calibration_tokens, gptq, tune, args.calibration_text)
        suffix = ((args.gptq if gptq and "gptq" in scheme else []) + (args.tune if tune and "tune" in scheme else [])
                  + ([f"cal={'+'.join(args.calibration_text)}"] if args.calibration_text else []))
        name = scheme_name + ("[" + ",".join(suffix) + "]" if suffix else "")
        if name in rows and not args.redo:
            continue
        t0 = time.time()
        folder = args.out / "models" / scheme_name
        entry = seed_entry(args.seed_of) if scheme_name == "seed-size" else {}
        q = quantize_model(source, scheme, folder, entry)
        ppl = q["perplexity"]
        rows[name] = {"scheme": name, "method": q["method"], "bpw": q["bits_per_weight"], "bytes": q["bytes"],
                      "mean_rel_error": q["mean_rel_error"], "float": ppl["float"], "quant": ppl["quant"],
                      "increase_pct": ppl["increase_pct"], "formats": q.get("budget", {}).get("formats"),
                      "calibration_tokens": q["calibration"].get("tokens"), "peak_rss_mb": q["peak_rss_mb"],
                      "tune": {k: v for k, v in q["tune"].items() if k != "kl_curve"} if "tune" in q else None,
                      "time_s": round(time.time() - t0, 1)}
        print(json.dumps(rows[name]), flush=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
        if not args.keep:
            import shutil

            shutil.rmtree(folder)
    write_outputs(rows, args.out)
    return 0


def _gptq_options(pairs: list[str]) -> dict:
    """``["damp=0.03"]`` -> ``{"damp": 0.03}`` (values checked by the scheme)."""
    return _key_values("--gptq", pairs, {"damp": float, "table_damp": float},
                       "damp=<fraction> or table_damp=<fraction>")


def _tune_options(pairs: list[str]) -> dict:
    """``["steps=100", "params=table", "on"]`` -> ``{"steps": 100, "params": "table", "on": True}`` (values checked
    by the scheme)."""
    count = lambda value: int(value) if value.isdigit() else value  # noqa: E731  (the scheme rejects the rest)
    return _key_values("--tune", pairs, {"steps": count, "tokens": count, "topk": count, "lr": float, "params": str,
                                          "windows": str, "round_lr": float},
                       "on, norms, steps=, tokens=, topk=, lr=, params=, windows= or round_lr=", switches=("on", "norms"))


def _key_values(flag: str, pairs: list[str], types: dict, expected: str, switches: tuple = ()) -> dict:
    """``KEY=VALUE`` pairs of option ``flag`` converted by ``types[KEY]``; a bare name in ``switches`` is True."""
    opts: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep and key in switches:
            opts[key] = True
        elif sep and key in types:
            try:
                opts[key] = types[key](value)
            except ValueError:
                raise LlmoptError(f"{flag} {pair}: {value!r} is not a number") from None
        else:
            raise LlmoptError(f"{flag} {pair}: expected {expected}")
    return opts


def _load_rows(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def write_outputs(rows: dict, out: Path) -> None:
    """Table (md + csv) and plot, ours and llama.cpp's (``llamacpp.json`` beside, if present)."""
    anchors = _load_rows(out / "llamacpp.json")
    texts = sorted({t for r in list(rows.values()) + list(anchors.values()) for t in r["quant"]})
    lines = ["| scheme | method | bits/weight | cal. tokens | " + " | ".join(f"{t} ppl (vs float)" for t in texts) + " |",
             "|---|---|---|---|" + "---|" * len(texts)]
    table = []
    for r in sorted(list(rows.values()) + list(anchors.values()), key=lambda r: -r["bpw"]):
        cells = [f"{r['quant'][t]:.3f} ({r['increase_pct'][t]:+.2f}%)" if t in r["quant"] else "" for t in texts]
        lines.append(f"| {r['scheme']} | {r['method']} | {r['bpw']:.3f} | {r.get('calibration_tokens') or '-'} | "
                     + " | ".join(cells) + " |")
        table.append({"scheme": r["scheme"], "method": r["method"], "bpw": r["bpw"],
                      **{f"ppl_{t}": r["quant"].get(t) for t in texts}, **{f"float_{t}": r["float"].get(t) for t in texts}})
    floats = {t: next(r["float"][t] for r in list(rows.values()) + list(anchors.values()) if t in r["float"]) for t in texts}
    lines.append("\nfloat: " + ", ".join(f"{t} {v:.3f}" for t, v in floats.items()))
    write_text(out / "table.md", "\n".join(lines) + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(texts), figsize=(11 * len(texts), 7), squeeze=False)
    for ax, t in zip(axes[0], texts):
        top = 2.2 * floats[t]  # beyond +120% the points are off the chart, listed in a note instead
        off_chart = []
        for label, group, marker in (("llmopt", rows, "o"), ("llama.cpp", anchors, "s")):
            pts = sorted((r["bpw"], r["quant"][t], r["scheme"]) for r in group.values() if t in r["quant"])
            off_chart += [f"{n}: {y:.0f} at {x:.2f} bpw" for x, y, n in pts if y > top]
            pts = [p for p in pts if p[1] <= top]
            if pts:
                ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker, label=label, ms=7)
                for i, (x, y, n) in enumerate(pts):  # labels alternate sides so that neighbours stay readable
                    ax.annotate(n, (x, y), fontsize=8, xytext=(6, 2) if i % 2 else (-6, -10), textcoords="offset points",
                                ha="left" if i % 2 else "right")
        ax.axhline(floats[t], color="gray", ls="--", label=f"float32 ({floats[t]:.2f})")
        ax.set_yscale("log")
        ax.set_ylim(0.97 * floats[t], top)
        ax.set_xlabel("bits per weight (all stored bytes / all parameters)")
        ax.set_ylabel(f"perplexity, {t} (log)")
        ax.set_title(f"Gemma 3 270M, {t}")
        if off_chart:
            ax.text(0.99, 0.99, "off the chart:\n" + "\n".join(off_chart), transform=ax.transAxes, ha="right",
                    va="top", fontsize=8)
        ax.legend(loc="upper center")
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_bpw.png", dpi=120)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
