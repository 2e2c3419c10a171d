"""Rule report: llmopt.report.build_report(results_dir, config, out_dir)."""

from pathlib import Path

from llmopt.report import build_report
from llmopt.workflow import rule_step

with rule_step(snakemake):  # noqa: F821 (injected by Snakemake)
    smk = snakemake  # noqa: F821
    out_dir = Path(smk.output.html).parent
    build_report(out_dir.parent, dict(smk.params.config), out_dir)
