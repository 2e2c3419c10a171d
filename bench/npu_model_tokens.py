"""Whole-model decode and prefill speed of ``iree-cpu`` vs ``cpu`` on the real Gemma 3 270M, int4 g128.

The real model (pip GGUF, ``llmopt.download.pip_gguf.ensure_reference_model``) is quantized round-to-nearest,
int4 group 128 symmetric (``llmopt.quant.quantizers``), every linear and the tied embedding/head, into a
temporary packed folder. Both backends load it in one process; their logits are first compared with the float32
reference (the CPU backend with every weight dequantized: ``quant="reference"``), then prefill
(``--prompt`` tokens) and greedy decode (``--gen`` tokens) are timed alternately, median of ``--repeats``.
The iree-cpu backend's coverage (which ops ran on the IREE kernels) is printed and saved.

    .venv/bin/python bench/npu_model_tokens.py [--prompt 64] [--gen 32] [--repeats 3] [--out results/bench/npu_model_tokens.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from llmopt.backends.cpu import CpuBackend
from llmopt.bench.measure import engine_once
from llmopt.download.pip_gguf import ensure_reference_model
from llmopt.engine import load_model
from llmopt.fsutil import write_json
from llmopt.quant.format import save_packed
from llmopt.quant.quantizers import Spec, quantize


def quantized_copy(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.suffix in (".json", ".model", ".jinja", ".txt"):
            shutil.copy2(f, dst / f.name)
    tensors = {}
    for shard in sorted(src.glob("model*.safetensors")):
        tensors.update(load_file(shard))
    spec = Spec(bits=4, group=128)
    packed = {name: quantize(t.float(), spec, name=name) if t.ndim == 2 and spec.fits(tuple(t.shape)) else t
              for name, t in tqdm(tensors.items(), desc="quantize", leave=False)}
    save_packed(dst / "model.safetensors", packed)


def run(model, prompt: torch.Tensor, gen: int) -> tuple[float, float]:
    """Prefill and decode tok/s of one run, timed as the benchmark stage times it."""
    prefill_s, decode_s = engine_once(model, prompt, gen)
    return prompt.shape[1] / prefill_s, gen / decode_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (prefill)")
    ap.add_argument("--gen", type=int, default=32, help="generated tokens (decode)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per backend (after one warm-up)")
    ap.add_argument("--out", type=Path, default=Path("results/bench/npu_model_tokens.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        quantized_copy(ensure_reference_model(), Path(tmp))
        prompt = torch.randint(10, 1000, (1, args.prompt), generator=torch.Generator().manual_seed(0))
        ref = load_model(tmp, backend=CpuBackend(quant="reference")).forward_logits(prompt[:, :16])
        models = {name: load_model(tmp, backend=name) for name in ("cpu", "iree-cpu")}
        err = {name: (m.forward_logits(prompt[:, :16]) - ref).abs().max().item() for name, m in models.items()}
        scale = max(1.0, ref.abs().max().item())
        assert err["iree-cpu"] < 1e-4 * scale, f"iree-cpu logits differ from the float32 reference by {err['iree-cpu']}"
        samples = {name: [] for name in models}
        for rep in tqdm(range(args.repeats + 1), desc="runs"):
            for name, model in models.items():
                result = run(model, prompt, args.gen)
                if rep:  # the first round warms up (and compiles the IREE modules)
                    samples[name].append(result)
        coverage = models["iree-cpu"].backends["iree-cpu"].coverage()
    rows = {name: {"prefill_tok_s": statistics.median(s[0] for s in runs), "decode_tok_s": statistics.median(s[1] for s in runs),
                   "decode_tok_s_best": max(s[1] for s in runs), "runs": runs} for name, runs in samples.items()}
    record = {"date": dt.datetime.now(dt.timezone.utc).isoformat(), "model": "gemma-3-270m (real), int4 g128 rtn",
              "command": f"bench/npu_model_tokens.py --prompt {args.prompt} --gen {args.gen} --repeats {args.repeats}",
              "logits_max_abs_diff_vs_f32_reference": err, "logit_scale": scale, "loadavg_1min": [load_before, os.getloadavg()[0]], "backends": rows,
              "iree_coverage": coverage}
    write_json(args.out, record)
    print("| backend | prefill tok/s | decode tok/s (median / best) |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} / {r['decode_tok_s_best']:.1f} |")
    print(f"logits max |x - float32 reference| (logit scale {scale:.1f}): "
          + ", ".join(f"{k} {v:.2e}" for k, v in err.items()) + f"; iree calls: {coverage['calls']}")
    print(f"1-min load average before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f}; written {args.out}")


if __name__ == "__main__":
    main()
