"""Whole models on the Vulkan backend (lavapipe in CI) against the CPU backend's float32 reference.

Every family at tiny scale with fresh random weights (float, and packed int2/3/4/8 mixed per tensor), the
Qwen2.5-VL tiny model with an image, and the real Gemma 3 270M. Checks: logits of every position within 1e-4
absolute of CpuBackend(quant="reference") on logits of magnitude ~1-10 (3e-3 for the real model, logits ~25);
prefill + decode steps through the device KV cache equal the full forward; greedy tokens identical.
"""

from __future__ import annotations

import pytest
import torch

import tiny_models
from llmopt.engine import load_model
from tiny_models import COMMON, pack_folder, save_random

from vulkan_device import require_vulkan
vulkan = require_vulkan()
pytestmark = pytest.mark.vulkan

ATOL = 1e-4
FAMILIES = {name: tiny_models.FAMILIES[name] for name in ("gemma2", "gemma3", "qwen2")}


@pytest.fixture(scope="module")
def backends():
    from llmopt.backends.cpu import CpuBackend

    be = vulkan.VulkanBackend()
    yield be, CpuBackend(quant="reference")
    be.close()


def quantize_folder(src, dst, seed: int):
    """The same model with every 2-D weight packed, bit widths 2/3/4/8 and group sizes mixed across tensors."""
    from llmopt.quant.quantizers import Spec

    specs = [Spec(4, 32), Spec(8, 0), Spec(3, 32, sym=False), Spec(2, 32, scale_dtype="bfloat16"), Spec(4, 64, sym=False)]
    return pack_folder(src, dst, specs, seed % len(specs))


def compare(models, ids, name, atol=ATOL):
    ours, ref = (m.forward_logits(ids) for m in models)
    err = (ours - ref).abs().max().item()
    assert err <= atol, f"{name}: max |vulkan - cpu| {err:.2e} (logit scale {ref.abs().max():.2f})"


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("packed", [False, True], ids=["float", "packed"])
def test_tiny_family_matches_cpu(backends, tmp_path, family, packed):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    folder = save_random(FAMILIES[family](), tmp_path / "f", seed)
    if packed:
        folder = quantize_folder(folder, tmp_path / "q", seed)
    before = dict(backends[0].kinds)
    vk_model, cpu_model = (load_model(folder, backend=b) for b in backends)
    if packed:  # the device really holds packed weights of every width
        assert all(backends[0].kinds.get(k, 0) > before.get(k, 0) for k in ("int2", "int3", "int4", "int8"))
    name = f"{family} {'packed' if packed else 'float'} seed={seed}"
    compare((vk_model, cpu_model), torch.randint(0, COMMON["vocab_size"], (2, 13)), name)
    # prefill + decode through the device KV cache (past the sliding window of 5) equals the CPU's
    ids = torch.randint(0, COMMON["vocab_size"], (1, 16))
    logits, state = vk_model.prefill(ids[:, :4], max_len=16)
    ref_logits, ref_state = cpu_model.prefill(ids[:, :4], max_len=16)
    for t in range(4, 16):
        assert (logits - ref_logits).abs().max() <= ATOL, f"{name} position {t}"
        logits, ref_logits = vk_model.decode_step(state, ids[:, t]), cpu_model.decode_step(ref_state, ids[:, t])
    # left-padded batch: greedy tokens equal the CPU's
    prompts = [torch.randint(0, COMMON["vocab_size"], (n,)).tolist() for n in (3, 9)]
    ours, ref = (m.generate(prompts, max_new_tokens=8, stop_ids=[]).tokens for m in (vk_model, cpu_model))
    assert ours == ref, name


def test_tiny_qwen25_vl_with_image(backends, tmp_path):
    from PIL import Image

    from llmopt.engine.vision import preprocess_image

    image_token, vstart, vend = tiny_models.IMAGE_TOKEN, tiny_models.VISION_START, tiny_models.VISION_END
    seed = int(torch.randint(0, 2**31 - 1, ()))
    vl = tiny_models.qwen25_vl(text_layers=2, vision_depth=2, full_attention_blocks=(1,))
    folder = save_random(vl, tmp_path, seed, scale=0.1)
    vk_model, cpu_model = (load_model(folder, backend=b) for b in backends)
    pixels = torch.randint(0, 256, (84, 140, 3), dtype=torch.uint8).numpy()
    image = preprocess_image(Image.fromarray(pixels), vk_model.args.vision)
    ids = torch.tensor([[5, 6, vstart] + [image_token] * image.n_tokens(2) + [vend, 8, 9]])
    ours, ref = (m.forward_logits(ids, images=[image]) for m in (vk_model, cpu_model))
    assert (ours - ref).abs().max() <= ATOL, f"seed={seed}"
    assert (vk_model.vision(image) - cpu_model.vision(image)).abs().max() <= ATOL, f"seed={seed}"


@pytest.mark.real_model
def test_real_gemma3_270m_matches_cpu(backends, reference_model_dir):
    vk_model, cpu_model = (load_model(reference_model_dir, backend=b) for b in backends)
    prompt = "The history of the city of Rome begins"
    ids = vk_model.tokenizer.encode(prompt)
    compare((vk_model, cpu_model), [ids], "gemma-3-270m", atol=3e-3)
    ours, ref = (m.generate(prompt, max_new_tokens=8) for m in (vk_model, cpu_model))  # vulkan: the replayed step
    assert ours.tokens == ref.tokens and ours.timings["decode_path"] == "replayed"
