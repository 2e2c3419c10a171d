"""Probe hardware targets: is each usable here, and if not, why (the workflow's probe stage).

    llmopt probe                       # every target, one line each
    llmopt probe vulkan -o results/targets/vulkan.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "probe"
HELP = "probe hardware targets (cpu, vulkan, npu, iree-cpu, cuda): present or not, and why"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from llmopt.backends import BACKENDS

    p.add_argument("targets", nargs="*", metavar="TARGET",
                   help=f"targets to probe (default: all of {', '.join(BACKENDS)})")
    p.add_argument("-o", "--out", type=Path,
                   help="write the JSON record here (one target only); without it a summary is printed")
    p.add_argument("--json", action="store_true", help="print the full JSON records instead of the summary")


def run(args: argparse.Namespace) -> int:
    from llmopt.backends import BACKENDS
    from llmopt.errors import LlmoptError
    from llmopt.probe import probe_record, write_probe

    targets = args.targets or list(BACKENDS)
    if args.out is not None:
        if len(targets) != 1:
            raise LlmoptError("--out takes exactly one TARGET")
        record = write_probe(targets[0], args.out)
        print(f"{targets[0]}: {'present' if record['present'] else 'absent'} -> {args.out}")
        return 0
    records = [probe_record(t) for t in targets]
    if args.json:
        print(json.dumps(records, indent=2, default=str))
        return 0
    for r in records:
        device = r["device"].get("name", "")
        print(f"{r['target']:9s} {'present' if r['present'] else 'absent ':7s}  {device or '-'}  ({r['reason']})")
    return 0
