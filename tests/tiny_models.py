"""Tiny Hugging Face models of every supported family, for tests that check llmopt against a reference.

Each builder makes the model from transformers' own config class (``**overrides`` replace any config key), at a
size that runs in milliseconds with every feature of the family on: sliding windows of 5 (shorter than the test
sequences, so window masking is exercised), Gemma 2 soft-capping, Gemma 3's per-layer-type RoPE with linear scaling,
Qwen2's own sliding-window rule, Qwen2.5-VL's windowed ViT, 2x2 merger and M-RoPE. ``randomize`` then overwrites
every parameter (norm weights and biases included, so no term is trivially zero) from a seeded generator.

    from tiny_models import FAMILIES, save_random
    folder = save_random(FAMILIES["gemma3"](), tmp_path / "g3", seed)
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
IMAGE_TOKEN, VISION_START, VISION_END = 300, 301, 302  # Qwen2.5-VL special ids inside the tiny vocabulary


def gemma2(**overrides):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(**{**COMMON, "sliding_window": 5, "attn_logit_softcapping": 5.0,
                                             "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 24,
                                             **overrides}))


def gemma3(**overrides):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    return Gemma3ForCausalLM(Gemma3TextConfig(**{**COMMON, "sliding_window": 5, "query_pre_attn_scalar": 24,
                                                 "rope_parameters": rope, "layer_types": types, **overrides}))


def qwen2(**overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**{**COMMON, "tie_word_embeddings": False,
                                           "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
                                           **overrides}))


def qwen2_sliding(**overrides):
    """Qwen2 with ``use_sliding_window``: windows on the layers from ``max_window_layers`` on, tied embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**{**COMMON, "tie_word_embeddings": True, "use_sliding_window": True,
                                           "sliding_window": 5, "max_window_layers": 2, **overrides}))


FAMILIES = {"gemma2": gemma2, "gemma3": gemma3, "qwen2": qwen2, "qwen2-sliding": qwen2_sliding}


def qwen25_vl(text_layers: int = 3, vision_depth: int = 4, full_attention_blocks: tuple = (1, 3)):
    """Qwen2.5-VL: window attention (56-pixel windows) in every vision block but ``full_attention_blocks``, the
    2x2 merger, M-RoPE sections; the image ids are ``IMAGE_TOKEN``, ``VISION_START`` and ``VISION_END``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=text_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
    vision = dict(depth=vision_depth, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                  patch_size=14, window_size=56, fullatt_block_indexes=list(full_attention_blocks),
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, video_token_id=303))


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.15) -> torch.nn.Module:
    """Every parameter drawn from N(0, scale^2) with a generator seeded by ``seed``; the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def save_random(model: torch.nn.Module, folder: Path, seed: int, scale: float = 0.15) -> Path:
    """``randomize`` the model and save it as a Hugging Face folder (config.json + model.safetensors)."""
    randomize(model, seed, scale).save_pretrained(folder)
    return folder


def pack_folder(src: Path, dst: Path, specs: list, offset: int = 0) -> Path:
    """A copy of model folder ``src`` with every 2-D weight RTN-packed (``llmopt.quant.quantizers.Spec``): the
    i-th tensor by name with ``specs[(i + offset) % len(specs)]``, kept float where that spec does not fit its
    shape; the JSON files copied beside."""
    import shutil

    from llmopt.quant.format import load_packed, save_packed
    from llmopt.quant.quantizers import quantize

    packed = {}
    for i, (name, t) in enumerate(sorted(load_packed(src / "model.safetensors").items())):
        spec = specs[(i + offset) % len(specs)]
        packed[name] = quantize(t.float(), spec, "rtn", name=name) if t.dim() == 2 and spec.fits(t.shape) else t
    dst.mkdir()
    save_packed(dst / "model.safetensors", packed)
    for f in src.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, dst / f.name)
    return dst
