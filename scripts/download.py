"""Rule download: llmopt.download.fetch(model_id, entry, out_dir, scale)."""

from pathlib import Path

from llmopt.download import fetch
from llmopt.workflow import rule_step

with rule_step(snakemake):  # noqa: F821 (injected by Snakemake)
    smk = snakemake  # noqa: F821
    fetch(smk.wildcards.model, smk.params.entry, Path(smk.output[0]), smk.params.scale)
