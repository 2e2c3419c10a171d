"""Print the AIE2 model's constants and, per registry model, the predicted NPU time of one decode step.

    python -m llmopt.costmodel [--bits 4] [--group 128] [--context 1024] [--json out.json]

Every number is a prediction (the NPU is not reachable here): all layers' linears and attention on the NPU,
the embedding, norms and head elsewhere. It shows what the 2 GB NPU share of a partition can reach.
"""

from __future__ import annotations

import argparse
import json
import sys

from llmopt.costmodel.aie2 import describe, predict_layer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4, help="weight bits of the linears (2, 4, 8)")
    ap.add_argument("--group", type=int, default=128, help="quantization group size")
    ap.add_argument("--context", type=int, default=1024, help="tokens in the KV cache")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args(argv)
    from llmopt import registry
    from llmopt.download.synthetic import build_config
    from llmopt.engine.config import ModelArgs

    print(json.dumps(describe(), indent=2))
    rows = []
    for model_id, entry in registry.load().models.items():
        if "architecture" not in entry:
            continue
        a = ModelArgs.from_hf(build_config(entry, "full").to_dict())
        layers = [predict_layer(a, args.bits, args.group, args.context, layer=i) for i in range(a.n_layers)]
        sec = sum(lay["seconds"] for lay in layers)
        moved = sum(lay["bytes"] for lay in layers)
        rows.append({"model": model_id, "layers": a.n_layers, "ms_per_token": 1e3 * sec, "tok_s": 1 / sec,
                     "gb_per_token": moved / 1e9, "launches": sum(len(lay["kernels"]) for lay in layers), "predicted": True})
    print("\n| model | layers | NPU ms/token (predicted) | tok/s (predicted) | GB moved/token | kernel calls |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['layers']} | {r['ms_per_token']:.1f} | {r['tok_s']:.1f} | {r['gb_per_token']:.2f} | {r['launches']} |")
    if args.json:
        from llmopt.fsutil import write_json

        write_json(args.json, {"model": describe(), "decode": rows, "settings": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
