"""Quantize a model folder into the llmopt packed format (the workflow's quantize stage, one model, one scheme).

    llmopt quantize SOURCE_DIR OUT_DIR --scheme w4g128
    llmopt quantize SOURCE_DIR OUT_DIR --scheme '{"name": "q", "method": "gptq", "bits": 3, "group": 64, "sym": false}'
    llmopt quantize SOURCE_DIR OUT_DIR --scheme seed-size --model qwen2.5-7b-instruct

Presets: bf16, w8, w8g32, w4g128, w4g128-mse, w4g128-gptq, w4g128-gptq-emb8 (token embedding / head int8 g32),
w4g32, w4g32-gptq, w3g64, w3g64-gptq, w2g32, seed-size. Scheme keys are documented in docs/FORMAT.md ("Schemes"). OUT_DIR receives config + tokenizer, packed safetensors, manifest.json and
quant.json (size, bits per weight, per-tensor error, perplexity when the weights are real); it appears only when
complete.
"""

from __future__ import annotations

import json
from pathlib import Path

NAME = "quantize"
HELP = "quantize a model folder (rtn, mse search, gptq, mixed precision to a byte budget)"


def add_arguments(p) -> None:
    p.add_argument("source_dir", type=Path, help="model folder: config.json + safetensors (+ tokenizer if real)")
    p.add_argument("out_dir", type=Path, help="output folder (replaced atomically)")
    p.add_argument("--scheme", default="w4g128",
                   help="preset name or a JSON scheme dict (default w4g128); see docs/FORMAT.md")
    p.add_argument("--model", help="registry id in config/models.yaml, for budget: seed (reads seed.size_gb, params_full)")
    p.add_argument("--models-yaml", type=Path, default=Path("config/models.yaml"),
                   help="registry file used with --model (default config/models.yaml)")
    p.add_argument("--no-perplexity", action="store_true", help="skip the perplexity evaluation of real models")


def run(args) -> int:
    from llmopt.errors import LlmoptError
    from llmopt.quant.pipeline import quantize_model
    from llmopt.quant.schemes import resolve

    scheme_text = args.scheme.strip()
    if scheme_text.startswith("{"):
        try:
            scheme = json.loads(scheme_text)
        except json.JSONDecodeError as err:
            raise LlmoptError(f"--scheme: not valid JSON ({err.msg})") from None
    else:
        scheme = resolve(scheme_text)
    if args.no_perplexity:
        scheme["perplexity"] = False
    entry = {}
    if args.model:
        import yaml

        try:
            entry = yaml.safe_load(args.models_yaml.read_text())["models"][args.model]
        except FileNotFoundError:
            raise LlmoptError(f"{args.models_yaml}: file not found") from None
        except (KeyError, TypeError):
            raise LlmoptError(f"{args.models_yaml}: no model '{args.model}' under 'models'") from None
    q = quantize_model(args.source_dir, scheme, args.out_dir, entry)
    print(f"{args.out_dir}: {q['bytes'] / 1e6:.1f} MB, {q['bits_per_weight']:.3f} bits/weight, "
          f"{q['compression']:.2f}x smaller, mean relative error {q['mean_rel_error']:.4f}")
    ppl = q["perplexity"]
    if "quant" in ppl:
        for text, value in ppl["quant"].items():
            print(f"  perplexity {text}: {value:.3f} (float {ppl['float'][text]:.3f}, {ppl['increase_pct'][text]:+.2f}%)")
    return 0
