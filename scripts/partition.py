"""Rule partition: llmopt.partition.write_plan(quant_dir, model_entry, target, probes, settings, out)."""

from pathlib import Path

from llmopt.fsutil import read_json
from llmopt.partition import write_plan
from llmopt.workflow import rule_step

with rule_step(snakemake):  # noqa: F821 (injected by Snakemake)
    smk = snakemake  # noqa: F821
    probes = {Path(p).stem: read_json(p) for p in smk.input.probes}
    settings = {**smk.params.settings, "calibration": smk.input.calibration, "laptop": smk.input.laptop}
    write_plan(Path(smk.input.quant), smk.params.entry, smk.wildcards.target, probes, settings, Path(smk.output[0]))
