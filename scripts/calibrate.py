"""Rule calibrate: llmopt.roofline.calibrate(present targets) -> results/targets/calibration.json."""

from llmopt.fsutil import write_json
from llmopt.roofline import calibrate
from llmopt.workflow import rule_step

with rule_step(snakemake):  # noqa: F821 (injected by Snakemake)
    smk = snakemake  # noqa: F821
    write_json(smk.output[0], calibrate(smk.params.targets, repeats=smk.params.settings.get("repeats", 3),
                                        size=smk.params.settings.get("size", 4096)))
