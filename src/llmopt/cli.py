"""The ``llmopt`` command line: one subcommand per module in ``llmopt.commands``.

    llmopt --help
    llmopt <command> --help

Each module in ``llmopt/commands/`` defines ``NAME``, ``HELP`` and ``add_arguments(parser)`` and ``run(args) -> int``.
Errors of type LlmoptError print as one line (``llmopt: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from llmopt import __version__
from llmopt.errors import LlmoptError


def build_parser() -> argparse.ArgumentParser:
    import llmopt.commands as commands

    parser = argparse.ArgumentParser(
        prog="llmopt",
        description="Quantize LLMs, compile kernels for CPU/Vulkan/NPU/CUDA targets, benchmark and report. "
        "The full pipeline runs through Snakemake (`snakemake --cores 4 all_models`); these commands run one step.",
    )
    parser.add_argument("--version", action="version", version=f"llmopt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"llmopt.commands.{info.name}")
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except LlmoptError as err:
        print(f"llmopt: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
