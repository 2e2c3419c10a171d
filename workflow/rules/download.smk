"""Download: results/{model}/source/ (config.json, safetensors, tokenizer, manifest.json) from the model's source.

Params carry the model's registry entry, so editing one model in models.yaml reruns that model's chain only.
"""


rule download:
    output:
        directory("results/{model}/source"),
    params:
        entry=model_entry,
        scale=download_scale,
    log:
        "results/logs/download/{model}.log",
    benchmark:
        "results/logs/download/{model}.tsv"
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        "../envs/llmopt.yaml"
    script:
        "../../scripts/download.py"
