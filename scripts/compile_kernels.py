"""Rule compile_kernels: llmopt.backends.npu.compile.compile_kernels(kernel_dir, out_dir, probe, target)."""

from pathlib import Path

from llmopt.backends.npu.compile import compile_kernels
from llmopt.fsutil import read_json
from llmopt.workflow import rule_step

with rule_step(snakemake):  # noqa: F821 (injected by Snakemake)
    smk = snakemake  # noqa: F821
    out_dir = Path(smk.output[0]).parent
    compile_kernels(Path(smk.params.kernel_dir), out_dir, read_json(smk.input.probe), smk.wildcards.target)
