"""CudaBackend on an NVIDIA GPU: correctness against the CPU reference, then full-scale Qwen2.5-7B int4 decode speed.

    python bench/engine_cuda.py --out $OUT/engine_cuda.json      # on the GPU machine (device tool)

1. Correctness: a tiny random Qwen2 and Gemma 2 (packed int4 g128, float norms) run on CudaBackend (fast int4
   kernel ``_weight_int4pack_mm``) and on CpuBackend ``quant="reference"`` (float32 dequantized weights); logits
   agree within 2e-2 relative (bf16 kernel input on the GPU). Then the CUDA-graph decode step
   (``llmopt.engine.cudagraph``, fused q/k/v and gate/up) against the same reference, step by step.
2. Speed (three llmopt modes on one loaded model: per-op eager, CUDA graph, CUDA graph + fused projections;
   graph capture timed apart, device argmax fed back so the graph loop has no host sync), and the decode ceiling
   (int4 weight bytes per token over the measured device copy bandwidth). Qwen2.5-7B-Instruct's exact shapes
   (FACTS §1) with random int4 g128 weights generated on the GPU (speed does not depend on values), batch 1, greedy decode of ``--new-tokens`` after a ``--prompt-tokens``
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


TINY = {"qwen2": {**QWEN7B, "hidden_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 512},
            "gemma2": {"model_type": "gemma2", "hidden_size": 256, "num_hidden_layers": 3, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 512, "vocab_size": 512,
                       "sliding_window": 8, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                       "query_pre_attn_scalar": 64, "hidden_activation": "gelu_pytorch_tanh"}}


def correctness() -> dict:
    res = {}
    for fam, cfg in TINY.items():
        args = ModelArgs.from_hf(cfg)
        tensors = random_tensors(args, "cuda", seed=1)
        gpu = Model(args, tensors, Path(fam), backend=CudaBackend(cuda_graphs=False))
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


def graph_correctness() -> dict:
    """CUDA-graph decode (StaticDecoder, fused q/k/v and gate/up) of the tiny models vs the CpuBackend reference:
    logits of 12 steps on random tokens, then greedy tokens vs the CPU reference and vs the per-op CUDA path."""
    from llmopt.engine.cudagraph import StaticDecoder

    res = {}
    for fam, cfg in TINY.items():
        args = ModelArgs.from_hf(cfg)
        tensors = random_tensors(args, "cuda", seed=2)
        gpu = Model(args, tensors, Path(fam), backend=CudaBackend())
        cpu = Model(args, to_cpu(tensors), Path(fam), backend=CpuBackend(quant="reference"))
        ids = torch.randint(0, 512, (1, 20))
        _, sg = gpu.prefill(ids, max_len=40)
        _, sc = cpu.prefill(ids, max_len=40)
        dec = StaticDecoder(gpu, sg, graph=True)
        err = 0.0
        for _ in range(12):
            tok = torch.randint(0, 512, (1,))
            a, b = dec.step(tok).cpu(), cpu.decode_step(sc, tok)
            err = max(err, ((a - b).abs().max() / b.abs().max()).item())
        eager = Model(args, tensors, Path(fam), backend=CudaBackend(cuda_graphs=False, fuse_linears=False))
        greedy = [m.generate(ids[0].tolist(), max_new_tokens=16, stop_ids=[]).tokens[0] for m in (gpu, cpu, eager)]

        def agree(x, y):
            return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x))

        res[fam] = {"max_rel_err": err, "ok": err < 2e-2, "greedy_tokens_agreeing_vs_cpu": agree(greedy[0], greedy[1]),
                    "greedy_tokens_agreeing_vs_cuda_eager": agree(greedy[0], greedy[2]), "tokens": 16}
    return res


def llmopt_speed(prompt: int, new: int) -> dict:
    """Decode speed without and with the CUDA graph, same model, same run (median of 3 each)."""
    from llmopt.engine.cudagraph import StaticDecoder

    args = ModelArgs.from_hf(QWEN7B)
    t0 = time.perf_counter()
    tensors = random_tensors(args, "cuda")
    backend = CudaBackend(cuda_graphs=False)
    model = Model(args, tensors, Path("qwen2.5-7b-synthetic"), backend=backend)
    del tensors
    load = time.perf_counter() - t0
    weight_bytes = sum(w.nbytes for layer in model.layers for w in layer.values() if hasattr(w, "kind"))
    weight_bytes += model.head.nbytes
    ids = torch.randint(0, args.vocab_size, (1, prompt))
    out = {"setup_s": load, "int4_weight_bytes_per_token": weight_bytes}
    for mode in ("eager", "graph", "graph_fused"):  # eager = the unfused per-op path measured before
        backend.fuse_linears = mode == "graph_fused"
        runs = []
        for _ in range(3):
            state = {}

            def prefill():
                logits, state["s"] = model.prefill(ids, max_len=prompt + new)
                tok = logits.argmax(-1)
                if mode != "eager":
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    state["d"] = StaticDecoder(model, state["s"], graph=True)
                    state["d"].capture()
                    torch.cuda.synchronize()
                    state["capture_s"] = time.perf_counter() - t0
                return tok

            def step(tok):
                if mode != "eager":  # device argmax fed back: no host sync in the loop
                    return state["d"].step(tok).argmax(-1)
                return model.decode_step(state["s"], tok).argmax(-1)

            runs.append(time_decode(step, prefill, new) + (state.get("capture_s", 0.0),))
        pre, dec, cap = sorted(runs, key=lambda r: r[1])[1]  # median of 3
        out[mode] = {"prefill_tok_s": prompt / (pre - cap), "decode_tok_s": (new - 1) / dec,
                     "runs_decode_s": [r[1] for r in runs], "capture_s": cap}
    out["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
    del model
    torch.cuda.empty_cache()
    return out


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read + written per second (best of 10): the decode ceiling's divisor."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del a, b
    return 2 * (1 << 30) / best


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
    rec["graph_correctness"] = graph_correctness()
    rec["copy_bandwidth_Bps"] = copy_bandwidth()
    rec["llmopt_int4"] = llmopt_speed(args.prompt_tokens, args.new_tokens)
    rec["decode_ceiling_tok_s"] = rec["copy_bandwidth_Bps"] / rec["llmopt_int4"]["int4_weight_bytes_per_token"]
    best = max(rec["llmopt_int4"][m]["decode_tok_s"] for m in ("graph", "graph_fused"))
    rec["graph_speedup"] = best / rec["llmopt_int4"]["eager"]["decode_tok_s"]
    rec["hf_bf16"] = hf_speed(args.prompt_tokens, args.new_tokens)
    if "decode_tok_s" in rec["hf_bf16"]:
        rec["graph_decode_ratio_vs_hf_bf16"] = best / rec["hf_bf16"]["decode_tok_s"]
    rec.update(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
               date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rec, indent=2, default=str))
    print(json.dumps(rec, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
