"""Whole models on the Vulkan backend (lavapipe in CI) against the CPU backend's float32 reference.

Every family at tiny scale with fresh random weights (float, and packed int2/3/4/8 mixed per tensor), the
Qwen2.5-VL tiny model with an image, and the real Gemma 3 270M. Checks: logits of every position within 1e-4
absolute of CpuBackend(quant="reference") on logits of magnitude ~1-10 (3e-3 for the real model, logits ~25);
prefill + decode steps through the device KV cache equal the full forward; greedy tokens identical.
"""

from __future__ import annotations

import pytest
import torch

from llmopt.engine import load_model

vulkan = pytest.importorskip("llmopt.backends.vulkan")
pytestmark = pytest.mark.vulkan
if not vulkan.probe()["present"]:
    pytest.skip(f"no Vulkan device: {vulkan.probe()['reason']}", allow_module_level=True)

ATOL = 1e-4
COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(**COMMON, sliding_window=5, attn_logit_softcapping=5.0,
                                          final_logit_softcapping=3.0, query_pre_attn_scalar=24))


def gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    return Gemma3ForCausalLM(Gemma3TextConfig(**COMMON, sliding_window=5, query_pre_attn_scalar=24,
                                              rope_parameters=rope, layer_types=types))


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6}))


FAMILIES = {"gemma2": gemma2, "gemma3": gemma3, "qwen2": qwen2}


@pytest.fixture(scope="module")
def backends():
    from llmopt.backends.cpu import CpuBackend

    be = vulkan.VulkanBackend()
    yield be, CpuBackend(quant="reference")
    be.close()


def save_random(hf, folder, seed: int, scale: float = 0.15):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    hf.eval().save_pretrained(folder)
    return folder


def quantize_folder(src, dst, seed: int):
    """The same model with every 2-D weight packed, bit widths 2/3/4/8 and group sizes mixed across tensors."""
    import shutil

    from llmopt.quant.format import load_packed, save_packed
    from llmopt.quant.quantizers import Spec, quantize

    specs = [Spec(4, 32), Spec(8, 0), Spec(3, 32, sym=False), Spec(2, 32, scale_dtype="bfloat16"), Spec(4, 64, sym=False)]
    tensors = load_packed(src / "model.safetensors")
    offset = seed % len(specs)
    packed = {}
    for i, (name, t) in enumerate(sorted(tensors.items())):
        spec = specs[(i + offset) % len(specs)]
        packed[name] = quantize(t.float(), spec, "rtn", name=name) if t.dim() == 2 and spec.fits(t.shape) else t
    dst.mkdir()
    save_packed(dst / "model.safetensors", packed)
    for f in src.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, dst / f.name)
    return dst


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
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from llmopt.engine.vision import preprocess_image

    image_token, vstart, vend = 300, 301, 302
    text = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
    vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, patch_size=14,
                  window_size=56, fullatt_block_indexes=[1], spatial_merge_size=2, temporal_patch_size=2)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=image_token,
                           vision_start_token_id=vstart, vision_end_token_id=vend, video_token_id=303)
    seed = int(torch.randint(0, 2**31 - 1, ()))
    folder = save_random(Qwen2_5_VLForConditionalGeneration(cfg), tmp_path, seed, scale=0.1)
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
    ours, ref = (m.generate(prompt, max_new_tokens=16).tokens[0] for m in (vk_model, cpu_model))
    assert ours == ref
