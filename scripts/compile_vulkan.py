"""Rule compile_vulkan: gather the per-shader records into results/kernels/vulkan/manifest.json.

The manifest has the layout llmopt.backends.vulkan.compile writes (target, glslc, defines, spec, device, shaders),
or {"skipped": true, "reason": ...} when the probe found no Vulkan device.
"""

from llmopt.fsutil import read_json, write_json
from llmopt.workflow import rule_step

with rule_step(snakemake):  # noqa: F821 (injected by Snakemake)
    smk = snakemake  # noqa: F821
    probe = read_json(smk.input.probe)
    if not probe["present"]:
        manifest = {"target": "vulkan", "skipped": True, "reason": probe["reason"], "shaders": {}}
    else:
        records = [read_json(path) for path in smk.input.records]
        manifest = {k: v for k, v in records[0].items() if k != "shader"} if records else {"target": "vulkan"}
        manifest["shaders"] = {}
        for record in records:
            stem = record["shader"]["spv"].removesuffix(".spv")
            manifest["shaders"][stem] = record["shader"]
    write_json(smk.output[0], manifest)
