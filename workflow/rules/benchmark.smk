"""Benchmark: results/{model}/{scheme}/{target}/bench.json, measured after a correctness check.

Takes every core (threads: workflow.cores) so no other job runs beside a timing; on an absent target it records
{"skipped": true, "reason": ...} from the probe.
"""


rule benchmark:
    input:
        quant="results/{model}/{scheme}/quant",
        source="results/{model}/source",
        plan="results/{model}/{scheme}/{target}/partition.json",
        probe="results/targets/{target}.json",
        kernels=lambda wildcards: compiled_for(wildcards.target),
    output:
        "results/{model}/{scheme}/{target}/bench.json",
    params:
        settings=config["bench"],
    threads: workflow.cores
    log:
        "results/logs/benchmark/{model}/{scheme}/{target}.log",
    benchmark:
        "results/logs/benchmark/{model}/{scheme}/{target}.tsv"
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=lambda wildcards: int(REG.all_targets[wildcards.target]["gpu"]),
    script:
        "../../scripts/benchmark.py"
