"""Generate text with the llmopt engine, streaming tokens as they come.

MODEL is a model folder (config.json + safetensors, float or packed) or a registry id from config/models.yaml:
an id resolves to results/ID/SCHEME/quant with --scheme, else to results/ID/source (the download stage's output).

examples:
  llmopt generate ~/.cache/llmopt/reference/gemma-3-270m "The history of Rome" --max-tokens 64
  llmopt generate gemma-3-270m "Tell me a joke" --scheme w4g128 --chat --temperature 0.7 --top-p 0.9 --seed 1
  llmopt generate qwen2.5-vl-7b-instruct "What is in this picture?" --image cat.jpg
  llmopt generate gemma-2-2b-it "Hi" --scheme w4g128 --plan results/gemma-2-2b-it/w4g128/vulkan/partition.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmopt.errors import LlmoptError

NAME = "generate"
HELP = "generate text from a model folder or registry id (streams tokens)"


def add_arguments(p) -> None:
    p.add_argument("model", help="model folder, or a registry id (see --scheme and --results)")
    p.add_argument("prompt", help="the prompt text; '-' reads it from standard input")
    p.add_argument("--image", action="append", type=Path, default=[],
                   help="an image file for a vision-language model (Qwen2.5-VL); repeat for several; implies --chat")
    p.add_argument("--max-tokens", type=int, default=128, help="most new tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 (the default) is greedy decoding")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample only from the smallest set of tokens whose probability reaches P (nucleus)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0: reproducible)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap the prompt in the tokenizer's chat template (default: when the folder has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="feed the prompt as plain text")
    p.add_argument("--system", default=None, help="a system message for the chat template")
    p.add_argument("--backend", default="cpu", help="target that runs the model: cpu (default), cuda, vulkan, ...")
    p.add_argument("--reference", action="store_true",
                   help="cpu/cuda: dequantize packed weights to float32 (the reference path) instead of the fast kernels")
    p.add_argument("--plan", type=Path, default=None,
                   help="a partition.json: run its layer segments on the devices it names (overrides --backend)")
    p.add_argument("--scheme", default=None, help="with a registry id: the quantization scheme folder to load")
    p.add_argument("--results", type=Path, default=Path("results"), help="results folder for registry ids (default results)")
    p.add_argument("--stats", action="store_true", help="print prefill/decode speed to standard error at the end")


def resolve_model(model: str, scheme: str | None, results: Path) -> Path:
    """A folder path as given, or the results folder of a registry id."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from llmopt import registry

        known = registry.load().all_models
    except (ImportError, LlmoptError):
        known = {}
    if model not in known:
        raise LlmoptError(f"model '{model}' is neither a folder nor a registry id"
                          + (f" (known ids: {', '.join(known)})" if known else ""))
    folder = results / model / scheme / "quant" if scheme else results / model / "source"
    if not folder.is_dir():
        step = f"the quantize stage for scheme '{scheme}'" if scheme else "the download stage (llmopt download)"
        raise LlmoptError(f"{folder}: not found; run {step} for {model} first")
    return folder


def run(args) -> int:
    from llmopt.backends import get_backend
    from llmopt.engine import load_model
    from llmopt.fsutil import read_json

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    folder = resolve_model(args.model, args.scheme, args.results)
    plan = read_json(args.plan) if args.plan else None
    backend = args.backend
    if args.reference:
        if backend not in ("cpu", "cuda"):
            raise LlmoptError(f"--reference applies to the cpu and cuda backends, not '{backend}'")
        backend = get_backend(backend, quant="reference")
    model = load_model(folder, backend=backend, plan=plan)
    tok = model.tokenizer
    chat = bool(args.image) or (tok.has_chat_template if args.chat is None else args.chat)
    ids = tok.chat(prompt, len(args.image), args.system) if chat else tok.encode(prompt)

    def stream(_, __, piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    out = model.generate(ids, max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, images=args.image or None, stream=stream)
    sys.stdout.write("\n")
    if args.stats:
        t = out.timings
        decode = f"{t['decode_tok_s']:.1f} tok/s" if t["decode_tok_s"] else "n/a"
        print(f"[{folder}] prompt {t['prompt_tokens']} tokens, prefill {t['prefill_tok_s']:.1f} tok/s, "
              f"ttft {t['ttft_s'] * 1000:.0f} ms, {t['new_tokens']} new tokens, decode {decode}, "
              f"finish: {out.finish[0]}", file=sys.stderr)
    return 0
