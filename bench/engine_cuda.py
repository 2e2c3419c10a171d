"""CudaBackend on an NVIDIA GPU: correctness against the CPU reference, then full-scale Qwen2.5-7B int4 decode speed.

    python bench/engine_cuda.py --out $OUT/engine_cuda.json      # on the GPU machine (device tool)

1. Correctness: a tiny random Qwen2 and Gemma 2 (packed int4 g128, float norms) run on CudaBackend (fast int4
   kernel ``_weight_int4pack_mm``) and on CpuBackend ``quant="reference"`` (float32 dequantized weights); logits
   agree within 2e-2 relative (bf16 kernel input on the GPU).
2. Speed: Qwen2.5-7B-Instruct's exact shapes (FACTS §1) with random int4 g128 weights generated on the GPU
   (speed does not depend on values), batch 1, greedy decode of ``--new-tokens`` after a ``--prompt-tokens``
   prompt; against HF transformers bf16 eager (random init on the GPU) in the same run when transformers imports.
Results print as JSON and go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmopt.backends.cpu import CpuBackend
from llmopt.backends.cuda import CudaBackend, probe
from llmopt.engine.config import ModelArgs
from llmopt.engine.model import Model
from llmopt.engine.weights import expected_shapes
from llmopt.quant.format import QuantizedTensor

QWEN7B = {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
          "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064, "rope_theta": 1e6,
          "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu"}


def random_tensors(args: ModelArgs, device, group=128, seed=0) -> dict:
    """Every tensor the decoder needs: int4 g128 packed 2-D weights (codes and fp16 scales), float vectors."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(args).items():
        if len(shape) == 2:
            n, k = shape
            q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device, generator=gen)
            s = (torch.rand(n, k // group, device=device, generator=gen) * 0.02 / (k ** 0.5) * 8).half()
            out[name] = QuantizedTensor(q, s, None, 4, group, (n, k))
        else:
            out[name] = torch.randn(shape, device=device, generator=gen) * 0.1
    return out


def to_cpu(tensors: dict) -> dict:
    return {n: QuantizedTensor(t.qweight.cpu(), t.scales.cpu(), None, t.bits, t.group, t.shape)
            if isinstance(t, QuantizedTensor) else t.cpu() for n, t in tensors.items()}


def correctness() -> dict:
    res = {}
    tiny = {"qwen2": {**QWEN7B, "hidden_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 512},
            "gemma2": {"model_type": "gemma2", "hidden_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512, "vocab_size": 512,
                       "sliding_window": 8, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                       "query_pre_attn_scalar": 64, "hidden_activation": "gelu_pytorch_tanh"}}
    for fam, cfg in tiny.items():
        args = ModelArgs.from_hf(cfg)
        tensors = random_tensors(args, "cuda", seed=1)
        gpu = Model(args, tensors, Path(fam), backend=CudaBackend())
        cpu = Model(args, to_cpu(tensors), Path(fam), backend=CpuBackend(quant="reference"))
        ids = torch.randint(0, 512, (2, 24))
        a, b = gpu.forward_logits(ids), cpu.forward_logits(ids)
        rel = ((a - b).abs().max() / b.abs().max()).item()
        ga = gpu.generate(ids[0].tolist(), max_new_tokens=16, stop_ids=[]).tokens[0]
        gb = cpu.generate(ids[0].tolist(), max_new_tokens=16, stop_ids=[]).tokens[0]
        agree = next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y), len(ga))
        res[fam] = {"max_rel_err": rel, "ok": rel < 2e-2, "kernels": gpu.backends["cuda"].kinds,
                    "greedy_tokens_agreeing": agree}
    return res


def time_decode(step, prefill, new):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    tok = prefill()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(new - 1):
        tok = step(tok)
    torch.cuda.synchronize()
    return t1 - t0, time.perf_counter() - t1


def llmopt_speed(prompt: int, new: int) -> dict:
    args = ModelArgs.from_hf(QWEN7B)
    t0 = time.perf_counter()
    tensors = random_tensors(args, "cuda")
    model = Model(args, tensors, Path("qwen2.5-7b-synthetic"), backend=CudaBackend())
    del tensors
    load = time.perf_counter() - t0
    ids = torch.randint(0, args.vocab_size, (1, prompt))
    runs = []
    for _ in range(3):
        state = {}

        def prefill():
            logits, state["s"] = model.prefill(ids, max_len=prompt + new)
            return logits.argmax(-1)

        def step(tok):
            return model.decode_step(state["s"], tok).argmax(-1)

        runs.append(time_decode(step, prefill, new))
    pre, dec = sorted(runs, key=lambda r: r[1])[1]  # median of 3
    mem = torch.cuda.max_memory_allocated()
    del model
    torch.cuda.empty_cache()
    return {"prefill_tok_s": prompt / pre, "decode_tok_s": (new - 1) / dec, "setup_s": load, "peak_mem_bytes": mem}


@torch.no_grad()
def hf_speed(prompt: int, new: int) -> dict:
    try:
        from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM
    except ImportError as err:
        return {"skipped": True, "reason": f"transformers not importable: {err}"}
    cfg = Qwen2Config(**{k: v for k, v in QWEN7B.items() if k != "model_type"})
    torch.set_default_device("cuda")
    torch.set_default_dtype(torch.bfloat16)
    model = Qwen2ForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    torch.set_default_device("cpu")
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), device="cuda")
    runs = []
    for _ in range(3):
        st = {}

        def prefill():
            st["out"] = model(ids, past_key_values=DynamicCache(config=cfg), use_cache=True)
            return st["out"].logits[:, -1:].argmax(-1)

        def step(tok):
            st["out"] = model(tok, past_key_values=st["out"].past_key_values, use_cache=True)
            return st["out"].logits[:, -1:].argmax(-1)

        runs.append(time_decode(step, prefill, new))
    pre, dec = sorted(runs, key=lambda r: r[1])[1]
    import transformers

    return {"prefill_tok_s": prompt / pre, "decode_tok_s": (new - 1) / dec, "transformers": transformers.__version__,
            "attn": model.config._attn_implementation}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "engine_cuda.json")
    args = p.parse_args(argv)
    rec = {"probe": probe(), "torch": torch.__version__}
    if not rec["probe"]["present"]:
        print(json.dumps(rec, indent=2))
        return 1
    rec["correctness"] = correctness()
    rec["llmopt_int4"] = llmopt_speed(args.prompt_tokens, args.new_tokens)
    rec["hf_bf16"] = hf_speed(args.prompt_tokens, args.new_tokens)
    if "decode_tok_s" in rec["hf_bf16"]:
        rec["decode_ratio_vs_hf_bf16"] = rec["llmopt_int4"]["decode_tok_s"] / rec["hf_bf16"]["decode_tok_s"]
    rec.update(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
               date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=2, default=str))
    print(json.dumps(rec, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
