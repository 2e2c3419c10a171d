"""Rule quantize: llmopt.quant.pipeline.quantize_model(source_dir, scheme, out_dir, model_entry)."""

from pathlib import Path

from llmopt.quant.pipeline import quantize_model
from llmopt.workflow import rule_step

with rule_step(snakemake):  # noqa: F821 (injected by Snakemake)
    smk = snakemake  # noqa: F821
    quantize_model(Path(smk.input[0]), smk.params.scheme, Path(smk.output[0]), smk.params.entry)
