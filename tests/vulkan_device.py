"""The Vulkan test files' shared helpers: the gate (the backend module, or a skip of the calling test module when this
machine has no Vulkan device or the device lacks a feature the module's tests need), and a script run under the
Khronos validation layer that must print no message.

The validation layer comes from Debian's ``vulkan-validationlayers`` extracted (not installed) to
``~/.cache/llmopt/vulkan-validationlayers`` (or ``$LLMOPT_VK_VALIDATION_DIR``):
``apt-get download vulkan-validationlayers && dpkg-deb -x vulkan-validationlayers_*.deb DIR``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

VALIDATION_DIR = Path(os.environ.get("LLMOPT_VK_VALIDATION_DIR",
                                     Path.home() / ".cache" / "llmopt" / "vulkan-validationlayers"))


# the backend switches of a GPU's configuration that lavapipe's defaults leave off (int-dot mat-vecs over x8 rows and
# every fold): the tests turn them on to run the GPU's paths
GPU_CONFIG = ("matvec_int_dot", "matvec_x_q8", "fuse_gated_act", "fuse_producer_norm", "fuse_sandwich_norm",
              "fuse_embedding_norm")
# the shaders that include chain.glsl, each also built as {stem}_chain.spv
CHAINED_SHADERS = {"embedding", "embedding_norm", "rmsnorm", "add_rmsnorm", "gated_act", "logits_softcap", "rope",
                   "kv_store", "attention", "matvec_quant", "matvec_quant_idot", "rope_attention",
                   "rope_attention_clock"}


def require_vulkan(*features: str):
    """``llmopt.backends.vulkan`` once its probe finds a device with every probe feature in ``features``
    (e.g. ``integer_dot_product``); otherwise the calling module is skipped with the reason."""
    vulkan = pytest.importorskip("llmopt.backends.vulkan")
    probe = vulkan.probe()
    if not probe["present"]:
        pytest.skip(f"no Vulkan device: {probe['reason']}", allow_module_level=True)
    for feature in features:
        if not probe["features"].get(feature):
            pytest.skip(f"the Vulkan device lacks {feature}", allow_module_level=True)
    return vulkan


_TINY_INT4_SCRIPT = r'''
import sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[2])
from tiny_models import FAMILIES, pack_folder, save_random
from llmopt.backends.vulkan import VulkanBackend
from llmopt.engine import load_model
from llmopt.quant.quantizers import Spec

folder = pack_folder(save_random(FAMILIES["FAMILY"](), Path(sys.argv[1]) / "f", 0), Path(sys.argv[1]) / "q",
                     [Spec(4, 32, sym=False)])
be = VulkanBackend()
''' + f"for key in {GPU_CONFIG!r}:\n    setattr(be, key, True)\n"


def no_subgroup_backend(kernel_dir: Path):
    """A VulkanBackend on this machine's device from shaders compiled into ``kernel_dir`` as for a device without
    subgroup arithmetic (every sum through shared memory)."""
    import copy

    from llmopt.backends import vulkan
    from llmopt.backends.vulkan import compile as vk_compile

    probe = copy.deepcopy(vulkan.probe())
    probe["features"]["subgroup_arithmetic"] = False
    assert vk_compile.compile_shaders(vk_compile.REPO_SHADERS, kernel_dir, probe)["defines"]["USE_SUBGROUP"] == 0
    return vulkan.VulkanBackend(kernel_dir=kernel_dir)


def tiny_int4_script(family: str) -> str:
    """The opening of a validation-layer script (``run_under_validation_layer(script, tmp_dir, tests_dir)``): a tiny
    int4 model of ``family`` (tiny_models.FAMILIES) packed under argv[1] as ``folder``, and ``be``, a VulkanBackend
    with the GPU configuration's int-dot mat-vecs and folds on."""
    return _TINY_INT4_SCRIPT.replace("FAMILY", family)


def folded_greedy_script(family: str, op: str) -> str:
    """A validation-layer script: greedy decoding of a batch of two (left-padded, two replayed steps in flight) of a
    tiny int4 ``family`` model, asserting that every call of the backend's fold ``op`` folded its norm."""
    return tiny_int4_script(family) + f'''
model = load_model(folder, backend=be)
folds = []
fold = be.{op}
be.{op} = lambda *a: (lambda out: folds.append(out[1].rms is not None) or out)(fold(*a))
gen = model.generate([[5, 6, 7], [8, 9]], max_new_tokens=6, stop_ids=[])
assert gen.timings["decode_path"] == "replayed", gen.timings["decode_path"]
assert folds and all(folds), folds
be.close()
print("done")
'''


def run_under_validation_layer(script: str, *args: str, sync: bool = True) -> None:
    """Run ``python -c script *args`` under the Khronos validation layer with synchronization validation (which checks
    the barriers between commands too; ``sync=False``: without it); assert it printed "done", that the layer really
    ran, and no validation message. Skips the test when the layer is not extracted at ``VALIDATION_DIR``."""
    manifest = VALIDATION_DIR / "usr/share/vulkan/explicit_layer.d/VkLayer_khronos_validation.json"
    if not manifest.exists():
        pytest.skip(f"Khronos validation layer not extracted at {VALIDATION_DIR} "
                    "(apt-get download vulkan-validationlayers && dpkg-deb -x vulkan-validationlayers_*.deb DIR)")
    env = dict(os.environ, VK_LAYER_PATH=str(manifest.parent), VK_INSTANCE_LAYERS="VK_LAYER_KHRONOS_validation",
               VK_LOADER_DEBUG="layer",
               LD_LIBRARY_PATH=f"{VALIDATION_DIR / 'usr/lib/x86_64-linux-gnu'}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    if sync:
        env["VK_LAYER_ENABLES"] = "VK_VALIDATION_FEATURE_ENABLE_SYNCHRONIZATION_VALIDATION_EXT"
    res = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert 'Insert instance layer "VK_LAYER_KHRONOS_validation"' in log and "done" in res.stdout
    messages = [ln for ln in log.splitlines()
                if "Validation" in ln and ("Error" in ln or "Warning" in ln) or "VUID-" in ln or "SYNC-HAZARD" in ln]
    assert not messages, "\n".join(messages[:20])
