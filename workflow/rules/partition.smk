"""Partition: results/{model}/{scheme}/{target}/partition.json, the plan the engine executes on that target."""


rule partition:
    input:
        quant="results/{model}/{scheme}/quant",
        probes=expand("results/targets/{target}.json", target=TARGETS),
        calibration="results/targets/calibration.json",
    output:
        "results/{model}/{scheme}/{target}/partition.json",
    params:
        entry=model_entry,
        settings=partition_settings,
    log:
        "results/logs/partition/{model}/{scheme}/{target}.log",
    benchmark:
        "results/logs/partition/{model}/{scheme}/{target}.tsv"
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../envs/llmopt.yaml"
    script:
        "../../scripts/partition.py"
