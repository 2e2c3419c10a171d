"""Rule laptop_plan: llmopt.partition.write_laptop_plan(quant_dir, model_entry, settings, out)."""

from pathlib import Path

from llmopt.partition import write_laptop_plan
from llmopt.workflow import rule_step

with rule_step(snakemake):  # noqa: F821 (injected by Snakemake)
    smk = snakemake  # noqa: F821
    write_laptop_plan(Path(smk.input.quant), smk.params.entry, smk.params.settings, Path(smk.output[0]))
