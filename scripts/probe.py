"""Rule probe: llmopt.probe.write_probe(target, out)."""

from pathlib import Path

from llmopt.probe import write_probe
from llmopt.workflow import rule_step

with rule_step(snakemake):  # noqa: F821 (injected by Snakemake)
    record = write_probe(snakemake.wildcards.target, Path(snakemake.output[0]))  # noqa: F821
    print(f"{record['target']}: present={record['present']} ({record['reason']})")
