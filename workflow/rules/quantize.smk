"""Quantize: results/{model}/{scheme}/quant/ (a model folder with packed weights and quant.json)."""


rule quantize:
    input:
        "results/{model}/source",
    output:
        directory("results/{model}/{scheme}/quant"),
    params:
        scheme=lambda wildcards: scheme_dict(wildcards.scheme),
        entry=model_entry,
    log:
        "results/logs/quantize/{model}/{scheme}.log",
    benchmark:
        "results/logs/quantize/{model}/{scheme}.tsv"
    resources:
        mem_mb=8000,
        runtime=240,
    conda:
        "../envs/llmopt.yaml"
    script:
        "../../scripts/quantize.py"
