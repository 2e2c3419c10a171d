"""Shared by all stages: the validated registry, wildcard constraints, and the helpers of input functions."""

import json
import re
from pathlib import Path

from llmopt.backends.vulkan.compile import included_headers
from llmopt.partition import DEFAULT_DEVICES
from llmopt.registry import load as load_registry, rule_safe

REPO = Path(workflow.basedir)
# validates config.yaml, models.yaml, targets.yaml (schemas in ../schemas) before anything runs
REG = load_registry(config, base=REPO, where="config (config/config.yaml with --config/--configfile overrides)")
MODELS = list(REG.models)
SCHEMES = list(REG.schemes)
TARGETS = list(REG.targets)
SHADER_DIR = REPO / config["shaders_dir"]  # relative paths are the repository's
KERNEL_DIR = REPO / config["kernels_dir"]
SHADERS = sorted(p.stem for p in SHADER_DIR.glob("*.comp"))
KERNEL_SOURCES = sorted(str(p) for p in KERNEL_DIR.glob("*") if p.is_file())


def shader_headers(wildcards):
    """The headers ``{shader}.comp`` includes, transitively: editing one reruns only the shaders that include it."""
    return sorted(str(p) for p in included_headers(SHADER_DIR / f"{wildcards.shader}.comp"))


def alternatives(names):
    """A regex matching exactly one of ``names`` (never a path with a slash)."""
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) or "(?!)"


# Any model of models.yaml, scheme of config.yaml and target of targets.yaml can be asked for by path.
wildcard_constraints:
    model=alternatives(REG.all_models),
    scheme=alternatives(config["schemes"]),
    target=alternatives(REG.all_targets),
    shader=alternatives(SHADERS),


def canonical(obj):
    """``obj`` with every dict's keys sorted: params compare equal whatever the key order in the YAML, so
    reordering a file reruns nothing while a changed value reruns what depends on it."""
    if isinstance(obj, dict):
        return {key: canonical(obj[key]) for key in sorted(obj)}
    if isinstance(obj, list):
        return [canonical(item) for item in obj]
    return obj


def model_entry(wildcards):
    """The registry entry of the job's model (a param: editing it reruns that model's chain)."""
    return canonical(REG.all_models[wildcards.model])


def scheme_dict(name):
    """The scheme dict handed to quantize_model: the config's definition with its name."""
    return canonical({"name": name, **config["schemes"][name]})


def probe_of(target):
    """The probe record of ``target`` (the probe checkpoint runs first; the DAG is re-evaluated after it)."""
    with open(checkpoints.probe.get(target=target).output[0]) as f:
        return json.load(f)


def compiled_for(target):
    """Compile manifests a run on ``target`` needs: its plan's devices that have kernels and are present here."""
    devices = [d for d in DEFAULT_DEVICES.get(target, [target]) if d in REG.all_targets]
    return [
        f"results/kernels/{d}/manifest.json"
        for d in devices
        if REG.all_targets[d]["compile"] != "none" and probe_of(d)["present"]
    ]


def bench_outputs(models=None, schemes=None, targets=None):
    """bench.json paths of models x schemes x targets (default: everything the config selects)."""
    return expand(
        "results/{model}/{scheme}/{target}/bench.json",
        model=models or MODELS,
        scheme=schemes or SCHEMES,
        target=targets or TARGETS,
    )


def download_scale(wildcards):
    """pip-gguf models are real at every scale: the config's scale does not change them."""
    entry = REG.all_models[wildcards.model]
    return "real" if entry["source"] == "pip-gguf" else config["scale"]


def shader_records(wildcards):
    """Per-shader compile records, when the probe found a Vulkan device."""
    if not probe_of("vulkan")["present"]:
        return []
    return expand("results/kernels/vulkan/{shader}.json", shader=SHADERS)


def benchmark_inputs(wildcards):
    """A benchmark on a present target needs the quantized model, its source, its plan and compiled kernels."""
    inputs = {"probe": f"results/targets/{wildcards.target}.json"}
    if probe_of(wildcards.target)["present"]:
        inputs.update(
            quant=f"results/{wildcards.model}/{wildcards.scheme}/quant",
            source=f"results/{wildcards.model}/source",
            plan=f"results/{wildcards.model}/{wildcards.scheme}/{wildcards.target}/partition.json",
            kernels=compiled_for(wildcards.target),
        )
    return inputs


def present_plans(wildcards):
    """partition.json of every model x scheme on the targets the probes found present."""
    present = [t for t in TARGETS if probe_of(t)["present"]]
    return expand("results/{model}/{scheme}/{target}/partition.json", model=MODELS, scheme=SCHEMES, target=present)


def bench_settings(wildcards):
    """The benchmark protocol of a model: `bench`, with `bench_tiny` merged over it for synthetic tiny models."""
    if download_scale(wildcards) == "tiny":
        return canonical({**config["bench"], **config["bench_tiny"]})
    return canonical(config["bench"])


def partition_settings(wildcards):
    """Partition settings: the model's benchmark protocol (lengths, batches) with the `partition` block."""
    return canonical({**bench_settings(wildcards), **config["partition"]})
