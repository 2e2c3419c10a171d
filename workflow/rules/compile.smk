"""Compile: results/kernels/{target}/ for the targets with kernels of their own.

Vulkan: one job per shader (shaders/{shader}.comp -> results/kernels/vulkan/{shader}.spv, its device variant chosen
from the probe), so changing one shader recompiles only it; compile_vulkan gathers the per-shader records into
manifest.json, which benchmarks on Vulkan read. NPU / IREE-CPU: the MLIR kernels of kernels/ through IREE (the
compiler caches per kernel by content). cpu and cuda have no compile step. Absent targets compile nothing; their
manifest records the probe's reason.
"""


rule compile_shader:
    input:
        comp=str(SHADER_DIR / "{shader}.comp"),
        headers=shader_headers,
        probe="results/targets/vulkan.json",
    output:
        spv="results/kernels/vulkan/{shader}.spv",
        record="results/kernels/vulkan/{shader}.json",
    log:
        "results/logs/compile/vulkan/{shader}.log",
    benchmark:
        "results/logs/compile/vulkan/{shader}.tsv"
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/llmopt.yaml"
    script:
        "../../scripts/compile_shader.py"


rule compile_vulkan:
    input:
        probe="results/targets/vulkan.json",
        records=shader_records,
    output:
        "results/kernels/vulkan/manifest.json",
    log:
        "results/logs/compile/vulkan.log",
    localrule: True
    conda:
        "../envs/llmopt.yaml"
    script:
        "../../scripts/compile_vulkan.py"


rule compile_kernels:
    input:
        kernels=KERNEL_SOURCES,
        probe="results/targets/{target}.json",
    output:
        "results/kernels/{target}/manifest.json",
    params:
        kernel_dir=lambda wildcards, input: str(Path(input.kernels[0]).parent),
    wildcard_constraints:
        target="npu|iree-cpu",
    log:
        "results/logs/compile/{target}.log",
    benchmark:
        "results/logs/compile/{target}.tsv"
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../envs/llmopt.yaml"
    script:
        "../../scripts/compile_kernels.py"
