"""The Vulkan target: our GLSL compute shaders (``shaders/``) through the ``vulkan`` Python package.

    from llmopt.backends.vulkan import VulkanBackend, probe
    probe()              # {"present", "reason", "device": {name, driver, memory, subgroup size, limits}, "features"}
    be = VulkanBackend() # every op of llmopt.backends.base.Backend on the first Vulkan device

Modules: ``compile`` (glslc to SPIR-V, per-device variants, the compile stage), ``device`` (probe, buffers,
pipelines, command recording, timestamps), ``backend`` (the ops), ``fusion`` (q/k/v and gate/up weights
concatenated on the device for one mat-vec), ``replay`` (a decode step recorded once and replayed per token). Set ``LLMOPT_VULKAN_DEVICE`` to pick another physical device than the first.
"""

from llmopt.backends.vulkan.device import probe

__all__ = ["VulkanBackend", "probe"]


def __getattr__(name: str):
    # imported on first use, so `python -m llmopt.backends.vulkan.compile` runs without importing the backend
    if name == "VulkanBackend":
        from llmopt.backends.vulkan.backend import VulkanBackend

        return VulkanBackend
    raise AttributeError(name)
