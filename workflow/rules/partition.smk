"""Partition: results/{model}/{scheme}/{target}/partition.json, the plan the engine executes on that target."""


rule laptop_plan:
    """The full-scale Phoenix laptop plans of a model x scheme, shared by every target's partition."""
    input:
        quant="results/{model}/{scheme}/quant",
    output:
        "results/{model}/{scheme}/laptop.json",
    params:
        entry=model_entry,
        settings=partition_settings,
    log:
        "results/logs/laptop_plan/{model}/{scheme}.log",
    benchmark:
        "results/logs/laptop_plan/{model}/{scheme}.tsv"
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        "../envs/llmopt.yaml"
    script:
        "../../scripts/laptop_plan.py"


rule partition:
    input:
        quant="results/{model}/{scheme}/quant",
        laptop="results/{model}/{scheme}/laptop.json",
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
