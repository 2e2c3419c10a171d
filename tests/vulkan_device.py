"""The Vulkan test files' shared gate: the backend module, or a skip of the calling test module when this machine
has no Vulkan device (or the device lacks a feature the module's tests need)."""

from __future__ import annotations

import pytest


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
