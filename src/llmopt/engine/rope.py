"""Rotary position tables, computed on the host: ``cos``/``sin`` ``[B, T, head_dim]`` per the Backend contract.

Covers the default RoPE, linear position scaling (Gemma 3 global layers), per-layer-type bases (Gemma 3: 1e6
global, 1e4 local) and Qwen2.5-VL's multimodal M-RoPE, where the frequency bands are split into sections
rotated by the temporal, height and width position of each token. Tables use the rotate-half layout
(``cat(freqs, freqs)``), as Hugging Face does, and are computed in float32 like HF so logits agree.
"""

from __future__ import annotations

import functools

import torch

from llmopt.engine.config import RopeArgs


@functools.lru_cache(maxsize=32)
def inv_freq(rope: RopeArgs, dim: int) -> torch.Tensor:
    """Inverse frequencies ``[dim / 2]`` (linear scaling divides them by ``factor``)."""
    freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return freq / rope.factor


def rope_tables(rope: RopeArgs, positions: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [B, T, dim]`` for int ``positions [B, T]``, or ``[3, B, T]`` (t, h, w) with M-RoPE sections."""
    freq = inv_freq(rope, dim)
    if rope.mrope_section is None:
        if positions.dim() == 3:  # text-only model given 3-axis positions: all three axes are equal
            positions = positions[0]
        angles = positions[..., None].float() * freq  # [B, T, dim/2]
    else:
        if positions.dim() == 2:  # plain text: the three axes share the position
            positions = positions.unsqueeze(0).expand(3, -1, -1)
        all_axes = positions[..., None].float() * freq  # [3, B, T, dim/2]
        chunks = all_axes.split(list(rope.mrope_section), dim=-1)
        angles = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def vision_rope_tables(theta: float, hw_positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL ViT 2-D RoPE: ``hw_positions [N, 2]`` -> ``cos, sin [1, N, head_dim]``.

    Half the head's frequencies rotate with the row index, half with the column index."""
    spatial = head_dim // 2
    freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
    angles = hw_positions[..., None].float() * freq  # [N, 2, spatial/2]
    angles = torch.cat([angles[:, 0], angles[:, 1]], dim=-1)  # [N, spatial]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().unsqueeze(0), emb.sin().unsqueeze(0)
