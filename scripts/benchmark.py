"""Rule benchmark: llmopt.bench.run_benchmark(quant_dir, source_dir, plan_path, target, probe, settings, out)."""

from pathlib import Path

from llmopt.bench import run_benchmark
from llmopt.fsutil import read_json
from llmopt.workflow import rule_step

with rule_step(snakemake):  # noqa: F821 (injected by Snakemake)
    smk = snakemake  # noqa: F821
    run_benchmark(Path(smk.input.quant), Path(smk.input.source), Path(smk.input.plan), smk.wildcards.target,
                  read_json(smk.input.probe), dict(smk.params.settings), Path(smk.output[0]))
