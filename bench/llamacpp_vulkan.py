"""llama.cpp's own decode speed on the same card: a synthetic full-scale GGUF, then ``llama-bench``.

The anchor for bench/vulkan_decode.py (issue 5): the same architectures (Qwen2.5-7B, Gemma 2 9B) at full scale with
random 4-bit weights, run by llama.cpp's Vulkan (or any) backend through its ``llama-bench`` tool, so both numbers
come from one card in one session. The hub is unreachable, so the GGUF is written here: the real shapes and
hyper-parameters, random Q4_0 blocks (fp16 scales drawn in a realistic range, random nibbles) for every matrix,
the output head included (as in our int4 synthetic models), float32 norms and biases, and a placeholder
SentencePiece-style vocabulary of the right size (llama-bench never tokenizes text: it feeds random token ids).

    python bench/llamacpp_vulkan.py --llama-bench /path/to/llama-bench --out results.json [--model qwen2.5-7b]
    python bench/llamacpp_vulkan.py --write-only --model qwen2.5-7b --gguf-dir /tmp/g --layers 2   # the file only

Writes ``--out`` (JSON: llama-bench's own JSON records plus the GGUF's size and the command). Decode speed is
llama-bench's ``tg`` test (``-n``), batch 1, all layers offloaded (``-ngl 99``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODELS = {
    "qwen2.5-7b": dict(arch="qwen2", hidden=3584, ffn=18944, layers=28, heads=28, kv_heads=4, head_dim=128,
                       vocab=152064, ctx=32768, eps=1e-6, rope_base=1e6, tied=False, qkv_bias=True),
    "gemma-2-9b": dict(arch="gemma2", hidden=3584, ffn=14336, layers=42, heads=16, kv_heads=8, head_dim=256,
                       vocab=256000, ctx=8192, eps=1e-6, rope_base=1e4, tied=True, qkv_bias=False,
                       attn_softcap=50.0, final_softcap=30.0, window=4096),
}
Q4_0_BLOCK, Q4_0_BYTES = 32, 18  # codes a block, bytes a block (fp16 scale + 16 bytes of nibbles)


def random_q4_0(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw Q4_0 bytes ``[rows, cols / 32 * 18]``: scales 0.002..0.006 (fp16), uniformly random nibbles."""
    if cols % Q4_0_BLOCK:
        raise SystemExit(f"Q4_0 needs rows of a multiple of {Q4_0_BLOCK} values, got {cols}")
    blocks = rows * cols // Q4_0_BLOCK
    out = np.empty((blocks, Q4_0_BYTES), dtype=np.uint8)
    out[:, :2] = (rng.random(blocks, dtype=np.float32) * 0.004 + 0.002).astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = rng.integers(0, 256, size=(blocks, 16), dtype=np.uint8)
    return out.reshape(rows, cols // Q4_0_BLOCK * Q4_0_BYTES)


def write_gguf(name: str, path: Path, layers: int | None = None, seed: int = 0) -> Path:
    """The synthetic ``name`` as a Q4_0 GGUF at ``path`` (written to a temporary name, then renamed)."""
    import gguf

    m = dict(MODELS[name])
    if layers:
        m["layers"] = layers
    rng = np.random.default_rng(seed)
    arch, h, f, hd = m["arch"], m["hidden"], m["ffn"], m["head_dim"]
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(f"synthetic-{name}")
    w.add_context_length(m["ctx"])
    w.add_embedding_length(h)
    w.add_block_count(m["layers"])
    w.add_feed_forward_length(f)
    w.add_head_count(m["heads"])
    w.add_head_count_kv(m["kv_heads"])
    w.add_layer_norm_rms_eps(m["eps"])
    w.add_rope_freq_base(m["rope_base"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    if arch == "gemma2":
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_attn_logit_softcapping(m["attn_softcap"])
        w.add_final_logit_softcapping(m["final_softcap"])
        w.add_sliding_window(m["window"])
    # A placeholder vocabulary of the model's size: <unk>, <s>, </s>, then plain pieces.
    n = m["vocab"]
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, n)])
    w.add_token_scores([0.0] * n)
    w.add_token_types([2, 3, 3] + [1] * (n - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    q4 = gguf.GGMLQuantizationType.Q4_0

    def matrix(tname: str, rows: int, cols: int) -> None:
        w.add_tensor(tname, random_q4_0(rows, cols, rng), raw_dtype=q4)  # shape in bytes

    def vector(tname: str, size: int, scale: float) -> None:
        w.add_tensor(tname, (rng.standard_normal(size, dtype=np.float32) * scale))

    matrix("token_embd.weight", n, h)
    vector("output_norm.weight", h, 0.1)
    if not m["tied"]:
        matrix("output.weight", n, h)
    q, kv = m["heads"] * hd, m["kv_heads"] * hd
    for i in range(m["layers"]):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", h, 0.1)
        for proj, rows in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
            matrix(p + proj + ".weight", rows, h)
            if m["qkv_bias"]:
                vector(p + proj + ".bias", rows, 0.02)
        matrix(p + "attn_output.weight", h, q)
        vector(p + "ffn_norm.weight", h, 0.1)
        matrix(p + "ffn_gate.weight", f, h)
        matrix(p + "ffn_up.weight", f, h)
        matrix(p + "ffn_down.weight", h, f)
        if arch == "gemma2":
            vector(p + "post_attention_norm.weight", h, 0.1)
            vector(p + "post_ffw_norm.weight", h, 0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()
    tmp.rename(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", type=Path, help="llama.cpp's llama-bench executable")
    ap.add_argument("--model", action="append", choices=sorted(MODELS), help="repeatable; default: all")
    ap.add_argument("--gguf-dir", type=Path, default=Path("/tmp/llmopt-gguf"), help="where the GGUFs are written")
    ap.add_argument("--layers", type=int, help="fewer layers (a quick check of the same code path)")
    ap.add_argument("--n-gen", type=int, default=128, help="decoded tokens of llama-bench's tg test")
    ap.add_argument("--repeats", type=int, default=3, help="llama-bench -r")
    ap.add_argument("--write-only", action="store_true", help="write the GGUFs, run nothing")
    ap.add_argument("--out", type=Path, help="results JSON")
    args = ap.parse_args(argv)
    if not args.write_only and (args.llama_bench is None or args.out is None):
        ap.error("--llama-bench and --out are needed unless --write-only")
    args.gguf_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.model or sorted(MODELS):
        path = args.gguf_dir / f"{name}-q4_0{'-l%d' % args.layers if args.layers else ''}.gguf"
        t0 = time.perf_counter()
        if not path.exists():
            write_gguf(name, path, args.layers)
        print(f"{name}: {path} {path.stat().st_size / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.write_only:
            continue
        cmd = [str(args.llama_bench), "-m", str(path), "-ngl", "99", "-p", "0", "-n", str(args.n_gen),
               "-r", str(args.repeats), "-o", "json"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        print(run.stderr[-3000:], file=sys.stderr)
        if run.returncode != 0:
            results.append({"model": name, "command": cmd, "error": run.stderr[-2000:]})
            continue
        records = json.loads(run.stdout)
        for r in records:
            print(f"{name}: {r.get('backends')} tg{r.get('n_gen')} {r.get('avg_ts'):.1f} tok/s "
                  f"(+- {r.get('stddev_ts'):.1f}) on {r.get('gpu_info')}", flush=True)
        results.append({"model": name, "gguf_bytes": path.stat().st_size, "command": cmd, "llama_bench": records})
    if args.out:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.rename(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
