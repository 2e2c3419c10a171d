"""Engine speed on this CPU: the real Gemma 3 270M, llmopt (float32, int8, int4) vs HF transformers and llama.cpp.

    .venv/bin/python bench/engine_cpu.py                       # 128-token prompt, 64 new tokens, 3 rounds
    .venv/bin/python bench/engine_cpu.py --prompt-tokens 512 --new-tokens 128 --threads 2 --rounds 5

Every engine gets the same prompt ids (the start of Hamlet) and decodes greedily with a KV cache; each round runs
every engine once, one after the other (interleaved, so load changes on a shared machine hit all of them alike),
and the table reports the median over rounds with the min..max spread. Prefill tok/s = prompt tokens / time to
the first greedy token; decode tok/s = (new tokens - 1) / the time after that. One run of each engine is the
library's (``llmopt.bench.measure.engine_once``, ``llmopt.bench.baselines.hf_once`` / ``llama_cpp_once``), so
these numbers are defined as the workflow's benchmark records are.

- llmopt float32: the source folder (CpuBackend reference path: float32 everywhere).
- llmopt int8 / int4: RTN per-channel int8 and group-128 symmetric int4 of every 2-D weight (embedding/tied
  head included), packed with ``llmopt.quant.quantizers`` and cached under ~/.cache/llmopt/bench/; the CpuBackend
  fast path (int4pack / int8pack kernels, bf16 kernel input). The load-time repack is timed.
- HF transformers float32 and bfloat16: the same folder, eager, a manual greedy loop with its DynamicCache.
- llama.cpp: llama-cpp-python on the pip package's GGUF (Q5_0/Q8_0 tensors), same threads, ggml's extra buffer
  types off (AMX faults in this VM; see LlamaCppEngine); skipped with the reason when llama_cpp is not installed.

Writes ``--out`` (JSON, default results/bench/engine_cpu.json), a bar chart beside it, and prints a markdown table.

``--kernels`` instead times one linear layer (batch-1 decode and a 128-row prefill) through each CpuBackend
weight path and its alternatives: float32 / bfloat16 dense, int4pack and int8pack with float32 or bfloat16 kernel
input, and 3-bit weights dequantized per call vs once at load (the choices the backend makes are the fastest).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from llmopt.bench.baselines import find_gguf, hf_once, llama_cpp_once, open_llama_cpp
from llmopt.bench.measure import engine_once
from llmopt.errors import LlmoptError

CACHE = Path.home() / ".cache" / "llmopt" / "bench"


def prompt_ids(tokenizer, n: int) -> list[int]:
    try:
        from llmopt.quant.texts import load_text

        text = load_text("hamlet")
    except Exception:  # the texts package is optional for this script: fall back to a fixed passage
        text = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer " * 200
    ids = tokenizer.encode(text)[:n]
    if len(ids) < n:
        raise SystemExit(f"the prompt text gives only {len(ids)} tokens, fewer than --prompt-tokens {n}")
    return ids


def packed_folder(source: Path, bits: int, group: int) -> Path:
    """An RTN-quantized copy of ``source`` (every 2-D weight), built once and cached."""
    from llmopt.fsutil import atomic_path
    from llmopt.quant.format import load_packed, save_packed
    from llmopt.quant.quantizers import Spec, quantize

    dst = CACHE / f"{source.name}-w{bits}{'c' if group == 0 else f'g{group}'}"
    if (dst / "model.safetensors").is_file():
        return dst
    tensors = load_packed(source / "model.safetensors")
    with atomic_path(dst) as tmp:
        tmp.mkdir()
        spec = Spec(bits, group, sym=True)
        packed = {n: quantize(t.float(), spec, "rtn", name=n) if t.dim() == 2 else t
                  for n, t in tqdm(tensors.items(), desc=f"quantize int{bits}", leave=False)}
        save_packed(tmp / "model.safetensors", packed)
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (source / f).is_file():
                shutil.copy(source / f, tmp / f)
    return dst


class LlmoptEngine:
    def __init__(self, folder: Path, **backend_options):
        from llmopt.backends import get_backend
        from llmopt.engine import load_model

        t0 = time.perf_counter()
        self.model = load_model(folder, backend=get_backend("cpu", **backend_options))
        be = self.model.backends["cpu"]
        self.info = {"load_s": time.perf_counter() - t0, "repack_s": be.repack_seconds, "kernels": dict(be.kinds)}

    def run(self, ids: list[int], new: int) -> tuple[float, float]:
        return engine_once(self.model, torch.tensor([ids]), new - 1)


class HfEngine:
    def __init__(self, folder: Path, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        self.info = {"load_s": time.perf_counter() - t0, "attn": self.model.config._attn_implementation}

    def run(self, ids: list[int], new: int) -> tuple[float, float]:
        return hf_once(self.model, torch.tensor([ids]), new - 1)


class LlamaCppEngine:
    def __init__(self, gguf: Path | None, threads: int, n_ctx: int, extra_bufts: bool = False):
        # extra buffer types off by default: the venv's llama.cpp is built for this CPU's AMX, and AMX tile
        # instructions raise SIGILL in this VM (tilezero, seen in gdb)
        if gguf is None:
            raise LlmoptError("no GGUF of the reference model")
        t0 = time.perf_counter()
        self.llm = open_llama_cpp(gguf, n_ctx, 512, threads, extra_bufts=extra_bufts)
        import llama_cpp

        self.info = {"load_s": time.perf_counter() - t0, "version": llama_cpp.__version__, "gguf": gguf.name,
                     "extra_bufts": extra_bufts}

    def run(self, ids: list[int], new: int) -> tuple[float, float]:
        return llama_cpp_once(self.llm, ids, new - 1)


def kernels(n: int, k: int, threads: int) -> str:
    """Time each weight path on an ``n x k`` layer; markdown rows of ms per call (median of repeats)."""
    from llmopt.backends.cpu import CpuBackend, QLinear
    from llmopt.quant.format import QuantizedTensor, pack_bits

    torch.set_num_threads(threads)

    def qt(bits, group):
        codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8)
        return QuantizedTensor(pack_bits(codes, bits), torch.rand(n, k // group).half() * 0.01, None, bits, group, (n, k))

    def ms(fn, reps=20):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    q4, q8, q3 = qt(4, 128), qt(8, k), qt(3, 128)
    w32 = q4.dequantize()
    fast, exact = CpuBackend(repack_cache=None), CpuBackend(kernel_dtype="float32", repack_cache=None)
    per_call_3bit = QLinear("per-call", n, None)
    paths = {
        "float32 dense": (fast, fast.linear_weight("w", w32)),
        "bfloat16 dense": (fast, QLinear("dense-bfloat16", n, w32.bfloat16())),
        "int4pack, bf16 input (default)": (fast, fast.linear_weight("w", q4)),
        "int4pack, float32 input": (exact, exact.linear_weight("w", q4)),
        "int8pack, bf16 input (default)": (fast, fast.linear_weight("w", q8)),
        "int8pack, float32 input": (exact, exact.linear_weight("w", q8)),
        "3-bit, bf16 at load (default)": (fast, fast.linear_weight("w", q3)),
        "3-bit, dequantized per call": (None, per_call_3bit),
    }
    rows = [f"| weight path ({n}x{k}, {threads} threads) | decode ms (1 row) | prefill ms (128 rows) |", "|---|---|---|"]
    for name, (be, w) in paths.items():
        cells = []
        for m in (1, 128):
            x = torch.randn(m, k)
            if be is None:
                cells.append(ms(lambda: torch.nn.functional.linear(x.bfloat16(), q3.dequantize(torch.bfloat16))))
            else:
                cells.append(ms(lambda: be.linear(x, w)))
        rows.append(f"| {name} | {cells[0]:.3f} | {cells[1]:.2f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; each runs every engine once (default 3)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and llama.cpp (default 2)")
    p.add_argument("--engines", default="llmopt-f32,llmopt-int8,llmopt-int4,hf-f32,hf-bf16,llama.cpp",
                   help="comma-separated subset of the engines to run")
    p.add_argument("--out", type=Path, default=Path("results/bench/engine_cpu.json"), help="JSON output path")
    p.add_argument("--kernels", action="store_true", help="time the weight paths of one 2048x2048 layer instead")
    args = p.parse_args(argv)
    if args.kernels:
        print(kernels(2048, 2048, args.threads))
        return 0

    from llmopt.download.pip_gguf import ensure_reference_model
    from llmopt.engine.tokenizer import Tokenizer
    from llmopt.engine.config import ModelArgs
    from llmopt.fsutil import write_json

    torch.set_num_threads(args.threads)
    source = ensure_reference_model()
    ids = prompt_ids(Tokenizer(source, ModelArgs.from_folder(source)), args.prompt_tokens)
    wanted = args.engines.split(",")
    builders = {
        "llmopt-f32": lambda: LlmoptEngine(source, quant="reference"),
        "llmopt-int8": lambda: LlmoptEngine(packed_folder(source, 8, 0)),
        "llmopt-int4": lambda: LlmoptEngine(packed_folder(source, 4, 128)),
        "hf-f32": lambda: HfEngine(source, torch.float32),
        "hf-bf16": lambda: HfEngine(source, torch.bfloat16),
        "llama.cpp": lambda: LlamaCppEngine(find_gguf(source), args.threads, args.prompt_tokens + args.new_tokens + 8),
    }
    engines, skipped = {}, {}
    for name in tqdm(wanted, desc="load engines"):
        if name not in builders:
            raise SystemExit(f"unknown engine '{name}' (expected {', '.join(builders)})")
        try:
            engines[name] = builders[name]()
        except ImportError as err:
            skipped[name] = f"not importable: {err}"
        except LlmoptError as err:
            skipped[name] = str(err)
    for e in engines.values():  # warm-up: first-call allocations and lazy init stay out of the timings
        e.run(ids[:16], 4)
    times = {name: [] for name in engines}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for name, e in engines.items():
            pre, dec = e.run(ids, args.new_tokens)
            times[name].append((len(ids) / pre, (args.new_tokens - 1) / dec))
    results = {}
    for name, ts in times.items():
        pf, dc = [t[0] for t in ts], [t[1] for t in ts]
        results[name] = {"prefill_tok_s": statistics.median(pf), "prefill_range": [min(pf), max(pf)],
                         "decode_tok_s": statistics.median(dc), "decode_range": [min(dc), max(dc)],
                         "info": engines[name].info}
    base = results.get("hf-f32", {}).get("decode_tok_s")
    for r in results.values():
        r["decode_vs_hf_f32"] = r["decode_tok_s"] / base if base else None
    record = {
        "model": "gemma-3-270m (real, from the pip GGUF)", "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
        "rounds": args.rounds, "threads": args.threads, "results": results, "skipped": skipped,
        "machine": {"cpu": _cpu_name(), "cores": __import__("os").cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_avg_after": _loadavg()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "bench/engine_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    write_json(args.out, record)
    _plot(record, args.out.with_suffix(".png"))
    print(table(record))
    return 0


def table(record: dict) -> str:
    rows = ["| engine | prefill tok/s (min..max) | decode tok/s (min..max) | decode vs HF f32 |", "|---|---|---|---|"]
    for name, r in record["results"].items():
        ratio = f"{r['decode_vs_hf_f32']:.2f}x" if r["decode_vs_hf_f32"] else "-"
        rows.append(f"| {name} | {r['prefill_tok_s']:.0f} ({r['prefill_range'][0]:.0f}..{r['prefill_range'][1]:.0f}) | "
                    f"{r['decode_tok_s']:.1f} ({r['decode_range'][0]:.1f}..{r['decode_range'][1]:.1f}) | {ratio} |")
    for name, why in record["skipped"].items():
        rows.append(f"| {name} | skipped: {why} | | |")
    return "\n".join(rows)


def _plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["results"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, title in ((axes[0], "prefill_tok_s", "prefill tok/s"), (axes[1], "decode_tok_s", "decode tok/s")):
        vals = [record["results"][n][key] for n in names]
        ax.barh(names, vals, color=["tab:blue" if n.startswith("llmopt") else "tab:gray" for n in names])
        ax.set_title(f"{title} ({record['prompt_tokens']}-token prompt, {record['threads']} threads)")
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.0f}" if v >= 10 else f" {v:.1f}", va="center")
    fig.suptitle(f"Gemma 3 270M on {record['machine']['cpu']}, {record['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
