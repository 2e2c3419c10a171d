"""Benchmark: results/{model}/{scheme}/{target}/bench.json, measured after a correctness check.

Takes every core (threads: workflow.cores) so no other job runs beside a timing. On a target the probe found
absent it needs nothing but the probe: it records {"skipped": true, "reason": ...} without quantizing or planning.
"""


rule benchmark:
    input:
        unpack(benchmark_inputs),
    output:
        "results/{model}/{scheme}/{target}/bench.json",
    params:
        settings=bench_settings,
    threads: workflow.cores
    log:
        "results/logs/benchmark/{model}/{scheme}/{target}.log",
    benchmark:
        "results/logs/benchmark/{model}/{scheme}/{target}.tsv"
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=lambda wildcards: int(REG.all_targets[wildcards.target]["gpu"]),
    conda:
        "../envs/llmopt.yaml"
    script:
        "../../scripts/benchmark.py"
