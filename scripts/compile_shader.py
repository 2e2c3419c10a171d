"""Rule compile_shader: one shader through llmopt.backends.vulkan.compile.compile_shaders.

compile_shaders builds every .comp of a folder; this rule gives it a folder holding only this shader (and the
shared headers it may include), so each shader is its own job and changing one recompiles only that one.
"""

import shutil
import tempfile
from pathlib import Path

from llmopt.backends.vulkan.compile import compile_shaders
from llmopt.fsutil import read_json, write_json
from llmopt.workflow import rule_step

with rule_step(snakemake):  # noqa: F821 (injected by Snakemake)
    smk = snakemake  # noqa: F821
    comp = Path(smk.input.comp)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "shaders"), Path(tmp, "spv")
        src.mkdir()
        for path in [comp, *map(Path, smk.input.headers)]:
            shutil.copy2(path, src / path.name)
        manifest = compile_shaders(src, out, read_json(smk.input.probe))
        shutil.copy2(out / f"{comp.stem}.spv", smk.output.spv)
    entry = {**manifest["shaders"][comp.stem], "source": str(comp), "rebuilt": True}
    write_json(smk.output.record, {**{k: v for k, v in manifest.items() if k != "shaders"}, "shader": entry})
