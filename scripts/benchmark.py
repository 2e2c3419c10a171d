"""Rule benchmark: llmopt.bench.run_benchmark(quant_dir, source_dir, plan_path, target, probe, settings, out).

On an absent target only the probe is an input; the paths handed over are where the model would be, and
run_benchmark records the probe's reason without reading them.
"""

from pathlib import Path

from llmopt.bench import run_benchmark
from llmopt.fsutil import read_json
from llmopt.workflow import rule_step

with rule_step(snakemake):  # noqa: F821 (injected by Snakemake)
    smk = snakemake  # noqa: F821
    w = smk.wildcards
    run_benchmark(Path(f"results/{w.model}/{w.scheme}/quant"), Path(f"results/{w.model}/source"),
                  Path(f"results/{w.model}/{w.scheme}/{w.target}/partition.json"), w.target,
                  read_json(smk.input.probe), dict(smk.params.settings), Path(smk.output[0]))
