"""Perplexity of a real model on held-out text, float or fake-quantized, computed with HF transformers.

The quantized model is evaluated by loading the float model with transformers and replacing each quantized
weight by ``QuantizedTensor.dequantize()`` ("fake quantization"), so quality does not depend on any engine.
Protocol (FACTS §2): the first ``tokens`` tokens of the text (tokenized without special tokens), split into
disjoint windows of ``window`` tokens; each window gets a BOS token in front and every one of its tokens is
predicted; perplexity = exp(mean negative log-likelihood over all predicted tokens).

    python -m llmopt.quant.perplexity MODEL_DIR [QUANT_DIR] [--text hamlet] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from llmopt.errors import LlmoptError
from llmopt.quant.format import QuantizedTensor
from llmopt.quant.texts import load_text


def load_model(model_dir: Path):
    """The float model and its tokenizer, in float32 on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").exists() and not (model_dir / "tokenizer_config.json").exists():
        raise LlmoptError(f"{model_dir}: no tokenizer files; perplexity needs a real model folder")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def text_tokens(tokenizer, text_name: str, tokens: int) -> torch.Tensor:
    """The first ``tokens`` token ids of a text (no special tokens)."""
    ids = tokenizer(load_text(text_name), add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise LlmoptError(f"text '{text_name}' has only {len(ids)} tokens, fewer than the {tokens} requested")
    return torch.tensor(ids[:tokens])


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, bos: int | None, window: int = 512, desc: str = "perplexity") -> float:
    """exp(mean NLL) over disjoint ``window``-token windows of ``ids``, each preceded by ``bos``."""
    total, count = 0.0, 0
    for start in tqdm(range(0, len(ids), window), desc=desc, leave=False):
        chunk = ids[start:start + window]
        inp = chunk if bos is None else torch.cat([torch.tensor([bos]), chunk])
        logits = model(inp.unsqueeze(0)).logits[0].float()
        targets = inp[1:]
        nll = torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum")
        total += nll.item()
        count += len(targets)
    return math.exp(total / count)


@torch.no_grad()
def apply_weights(model, tensors: dict[str, QuantizedTensor | torch.Tensor]) -> int:
    """Replace the model's parameters by ``tensors`` (dequantized where packed); returns how many were replaced."""
    params = dict(model.named_parameters())
    replaced = 0
    for name, t in tensors.items():
        if name not in params:
            continue  # e.g. an lm_head tied to the embedding is not a separate parameter
        value = t.dequantize() if isinstance(t, QuantizedTensor) else t
        if tuple(value.shape) != tuple(params[name].shape):
            raise LlmoptError(f"{name}: quantized shape {tuple(value.shape)} != model shape {tuple(params[name].shape)}")
        params[name].copy_(value.to(params[name].dtype))
        replaced += 1
    return replaced


def evaluate(model, tokenizer, texts: tuple[str, ...] = ("hamlet",), tokens: int = 4096, window: int = 512,
             label: str = "") -> dict[str, float]:
    """Perplexity of ``model`` on each text."""
    bos = tokenizer.bos_token_id
    return {name: perplexity(model, text_tokens(tokenizer, name, tokens), bos, window, desc=f"ppl {label} {name}")
            for name in texts}


def main(argv: list[str] | None = None) -> int:
    from llmopt.quant.io import load_folder

    p = argparse.ArgumentParser(prog="python -m llmopt.quant.perplexity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, help="float model folder (HF config, safetensors, tokenizer)")
    p.add_argument("quant_dir", type=Path, nargs="?", help="packed folder written by the quantize stage")
    p.add_argument("--text", action="append", help="text name (default hamlet); repeat for several")
    p.add_argument("--tokens", type=int, default=4096, help="tokens evaluated per text (default 4096)")
    p.add_argument("--window", type=int, default=512, help="window length in tokens (default 512)")
    args = p.parse_args(argv)
    model, tok = load_model(args.model_dir)
    if args.quant_dir:
        apply_weights(model, load_folder(args.quant_dir))
    for name, ppl in evaluate(model, tok, tuple(args.text or ["hamlet"]), args.tokens, args.window).items():
        print(f"{name}: perplexity {ppl:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
