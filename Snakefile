"""llmopt: eight LLMs through download -> quantize -> compile -> partition -> benchmark -> report.

    snakemake --cores 4 all_models                 # everything the config names, then the report
    snakemake --cores 2 --configfile .test/config.yaml   # the smallest run (CI)
    snakemake --cores 4 model_qwen2_5_7b_instruct  # one model's chain (rule-safe id), target_vulkan: one target
    snakemake --cores 4 results/gemma-3-270m/w4g128/cpu/bench.json   # any output path
    snakemake --report results/report.html         # Snakemake's own report of the run

Rules live in workflow/rules/ (one file per stage); scripts/ holds one thin entry per rule calling the library.
Config: config/config.yaml (schema-checked with config/models.yaml and config/targets.yaml on every run).
"""

from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")


configfile: str(Path(workflow.basedir) / "config" / "config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/quantize.smk"
include: "workflow/rules/compile.smk"
include: "workflow/rules/partition.smk"
include: "workflow/rules/benchmark.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/targets.smk"


rule all:
    """Default target: every model x scheme x target of the config, then the report."""
    default_target: True
    localrule: True
    input:
        rules.all_models.input,
