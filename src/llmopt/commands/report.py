"""Build the report from everything under a results folder: index.html (self-contained), report.md, summary.csv,
figures/. Absent targets, skipped stages and errors appear in the report rather than stopping it.

    llmopt report results --out results/report
"""

from __future__ import annotations

from pathlib import Path

NAME = "report"
HELP = "build results/report/{index.html, report.md, summary.csv, figures/} from the stage outputs"


def add_arguments(p) -> None:
    p.add_argument("results_dir", nargs="?", default="results", help="results folder (default results)")
    p.add_argument("--out", default=None, help="output folder (default RESULTS_DIR/report)")
    p.add_argument("--config", default=None,
                   help="workflow config (default config/config.yaml): model facts, seed targets")


def run(args) -> int:
    from llmopt import registry
    from llmopt.report import build_report

    out = Path(args.out) if args.out else Path(args.results_dir) / "report"
    build_report(Path(args.results_dir), registry.load(args.config).config, out)
    print(f"wrote {out}/index.html, {out}/report.md, {out}/summary.csv")
    return 0
