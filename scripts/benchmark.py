"""Rule benchmark: llmopt.bench.run_benchmark(quant_dir, source_dir, plan_path, target, probe, settings, out).

On an absent target only the probe is an input; the paths handed over are where the model would be, and
run_benchmark records the probe's reason without reading them. ``settings["kernel_dirs"]`` names the compile
stage's output per target ({"vulkan": "results/kernels/vulkan", ...}) for backends that load compiled kernels.
"""

from pathlib import Path

from llmopt.bench import run_benchmark
from llmopt.fsutil import read_json
from llmopt.workflow import rule_step

with rule_step(snakemake):  # noqa: F821 (injected by Snakemake)
    smk = snakemake  # noqa: F821
    w = smk.wildcards
    manifests = smk.input.get("kernels", [])
    manifests = [manifests] if isinstance(manifests, str) else manifests
    kernel_dirs = {Path(m).parent.name: str(Path(m).parent) for m in manifests}
    run_benchmark(Path(f"results/{w.model}/{w.scheme}/quant"), Path(f"results/{w.model}/source"),
                  Path(f"results/{w.model}/{w.scheme}/{w.target}/partition.json"), w.target,
                  read_json(smk.input.probe), {**smk.params.settings, "kernel_dirs": kernel_dirs}, Path(smk.output[0]))
