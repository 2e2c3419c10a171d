"""llama.cpp's quantizations of the real Gemma 3 270M, evaluated with the same text, tokens and windows as ours.

The shipped GGUF (Q5_0/Q8_0 tensors) is requantized with ``llama_cpp.llama_model_quantize`` (allow_requantize:
llama.cpp dequantizes to float32 first, which is exactly the float model our schemes start from, since the HF
reference folder is that GGUF dequantized). Perplexity uses llama.cpp's own logits on the token ids of the HF
tokenizer: windows of BOS + 512 tokens, every token predicted (``llmopt.quant.perplexity``'s protocol). Bits
per weight count the GGUF's tensor bytes (not its tokenizer metadata) over the parameter count. ``TYPE+pure``
quantizes every tensor, the embedding included, to TYPE (``llama_model_quantize_params.pure``): Q4_0+pure is the
same layout as our w4g32, Q8_0+pure as w8g32. ``+emb=T`` / ``+out=T`` set the embedding / output tensor types.
Writes ``OUT/llamacpp.json``, which ``bench/quant_quality.py`` merges into its table and plot.

    .venv/bin/python bench/quant_llamacpp.py --out bench/out/quant [--type Q4_K_M ...] [--text hamlet]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

DEFAULT_TYPES = ["Q8_0", "Q8_0+pure", "Q5_K_M", "Q4_K_M", "Q4_0", "Q4_1+pure", "Q4_0+pure", "Q3_K_M", "Q3_K_S", "Q2_K"]


def parse_type(spec: str) -> dict:
    """``TYPE[+pure][+emb=T][+out=T]`` -> llama_model_quantize settings. ``pure``: every tensor in TYPE (no
    K-quant mixture, no 8-bit embedding); ``emb`` / ``out``: the token embedding / output tensor type."""
    import llama_cpp

    ftype, *mods = spec.split("+")
    name = "ALL_F32" if ftype == "F32" else f"MOSTLY_{ftype}"
    if not hasattr(llama_cpp, f"LLAMA_FTYPE_{name}"):
        raise SystemExit(f"--type {spec}: llama.cpp has no file type {ftype}")
    out = {"ftype": getattr(llama_cpp, f"LLAMA_FTYPE_{name}"), "pure": False}
    for mod in mods:
        key, _, value = mod.partition("=")
        field = {"emb": "token_embedding_type", "out": "output_tensor_type"}.get(key)
        if mod == "pure":
            out["pure"] = True
        elif field and hasattr(llama_cpp, f"GGML_TYPE_{value}"):
            out[field] = getattr(llama_cpp, f"GGML_TYPE_{value}")
        else:
            raise SystemExit(f"--type {spec}: '{mod}' is not pure, emb=GGML_TYPE or out=GGML_TYPE")
    return out


def quantize_gguf(src: Path, dst: Path, spec: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    for field, value in parse_type(spec).items():
        setattr(params, field, value)
    params.allow_requantize = True
    params.nthread = 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize {spec} failed")


def tensor_bytes(path: Path) -> tuple[int, int, dict]:
    """(tensor bytes, parameters, {ggml type: count}) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    kinds: dict[str, int] = {}
    for t in reader.tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    return sum(int(t.n_bytes) for t in reader.tensors), sum(int(t.n_elements) for t in reader.tensors), kinds


def _no_extra_buffer_types() -> None:
    """Load models without llama.cpp's extra CPU buffer types (AMX / repacked weights): this VM advertises AMX but
    executing it raises SIGILL (exit 132) for every quantized model; plain CPU kernels work."""
    import llama_cpp

    default = llama_cpp.llama_cpp.llama_model_default_params
    if getattr(default, "no_extra_bufts", False):
        return

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    params.no_extra_bufts = True
    llama_cpp.llama_cpp.llama_model_default_params = params


def perplexity(path: Path, ids: list[int], bos: int, window: int = 512) -> float:
    from llama_cpp import Llama

    _no_extra_buffer_types()
    llm = Llama(model_path=str(path), n_ctx=window + 1, n_batch=window + 1, n_ubatch=window + 1,
                logits_all=True, n_threads=1, verbose=False)
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        toks = [bos] + ids[start:start + window]
        llm.reset()
        llm.eval(toks)
        logits = np.asarray(llm.scores[:len(toks)], dtype=np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        total -= float(sum(logp[i, toks[i + 1]] for i in range(len(toks) - 1)))
        count += len(toks) - 1
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/out/quant"), help="folder for llamacpp.json")
    p.add_argument("--type", action="append",
                   help=f"llama.cpp file type, TYPE[+pure][+emb=T][+out=T] (e.g. Q4_0+pure: the embedding in Q4_0 too; "
                        f"default {DEFAULT_TYPES})")
    p.add_argument("--text", action="append", help="evaluation text (default hamlet)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per text (default 4096)")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from llmopt.download.pip_gguf import assemble_gguf, ensure_reference_model
    from llmopt.quant.perplexity import text_tokens

    src = assemble_gguf()
    tok = AutoTokenizer.from_pretrained(ensure_reference_model())
    texts = args.text or ["hamlet"]
    ids = {t: text_tokens(tok, t, args.tokens).tolist() for t in texts}
    out_path = args.out / "llamacpp.json"
    rows = json.loads(out_path.read_text()) if out_path.exists() else {}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for ftype in ["F32"] + (args.type or DEFAULT_TYPES):
            path = Path(tmp) / "model.gguf"
            quantize_gguf(src, path, ftype)
            nbytes, params_n, kinds = tensor_bytes(path)
            ppl = {t: perplexity(path, ids[t], tok.bos_token_id) for t in texts}
            name = "llama.cpp " + ftype.replace("+", " ")
            rows[name] = {"scheme": name, "method": "llama.cpp", "bpw": 8 * nbytes / params_n,
                          "bytes": nbytes, "quant": ppl, "ggml_types": kinds}
            print(json.dumps(rows[name]), flush=True)
            path.unlink()
    base = rows.pop("llama.cpp F32")
    for r in rows.values():
        r["float"] = base["quant"]
        r["float_source"] = "llama.cpp F32 of the same GGUF"
        r["increase_pct"] = {t: 100 * (r["quant"][t] / base["quant"][t] - 1) for t in r["quant"]}
    out_path.write_text(json.dumps(rows, indent=1))
    print(f"llama.cpp F32 perplexity: {base['quant']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
