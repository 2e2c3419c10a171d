"""Probe: results/targets/{target}.json says whether the target is usable here, and why not.

A checkpoint: compile and benchmark inputs depend on what it finds (absent targets compile nothing and their
benchmarks record the reason). Rerun it on a changed machine with --forcerun probe.
"""


checkpoint probe:
    output:
        "results/targets/{target}.json",
    log:
        "results/logs/probe/{target}.log",
    benchmark:
        "results/logs/probe/{target}.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=lambda wildcards: int(REG.all_targets[wildcards.target]["gpu"]),
    conda:
        "../envs/llmopt.yaml"
    script:
        "../../scripts/probe.py"


rule calibrate:
    """Roofline calibration of the present targets (micro-benchmarks), read by every partition job."""
    input:
        expand("results/targets/{target}.json", target=TARGETS),
    output:
        "results/targets/calibration.json",
    params:
        targets=TARGETS,
        settings=config["calibrate"],
    threads: workflow.cores
    log:
        "results/logs/calibrate.log",
    benchmark:
        "results/logs/calibrate.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=int(any(REG.targets[t]["gpu"] for t in TARGETS)),
    conda:
        "../envs/llmopt.yaml"
    script:
        "../../scripts/calibrate.py"
