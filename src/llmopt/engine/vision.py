"""Qwen2.5-VL images: preprocessing into patches, the ViT tower on a backend, and multimodal RoPE positions.

- ``preprocess_image(image, vision_args)``: resize (aspect kept, sides multiples of 28, pixel count within the
  processor's bounds), scale to [0, 1], normalize with the CLIP mean/std, duplicate the frame over the temporal
  patch (2) and cut into 14x14 patches ordered by 2x2 merge blocks: ``ImageInput(pixel_values [N, 3*2*14*14],
  grid_thw)``. Matches transformers' Qwen2VLImageProcessor (PIL bicubic).
- ``VisionTower``: patch embedding (the Conv3d as a linear), blocks of RMSNorm -> attention with 2-D RoPE ->
  SwiGLU MLP; attention is within windows of 112 px except in the full-attention blocks (7/15/23/31); then the
  2x2 patch merger (RMSNorm, concat of 4 patches, MLP with GELU) gives one token per merge block in the text
  model's width. Tokens are reordered window by window first and restored at the end, as HF does.
- ``mrope_positions``: (t, h, w) positions of every prompt token: text advances all three together, image
  tokens take their grid row/column offset by the text before them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmopt.backends.base import AttnSpec
from llmopt.engine.config import ModelArgs, VisionArgs
from llmopt.engine.rope import vision_rope_tables
from llmopt.errors import LlmoptError
from llmopt.quant.format import QuantizedTensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280


@dataclass
class ImageInput:
    pixel_values: torch.Tensor  # float32 [t*h*w, C * temporal_patch * patch * patch]
    grid_thw: tuple[int, int, int]  # patches along time, height, width

    def n_tokens(self, merge: int) -> int:
        t, h, w = self.grid_thw
        return t * h * w // (merge * merge)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Sides rounded to multiples of ``factor`` with the pixel count in [min_pixels, max_pixels] (HF's rule)."""
    if max(height, width) / min(height, width) > 200:
        raise LlmoptError(f"image: aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def preprocess_image(image, vision: VisionArgs, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> ImageInput:
    """A PIL image or an image file path -> patches (see the module docstring)."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        try:
            image = Image.open(image)
            image.load()
        except (OSError, ValueError) as err:
            raise LlmoptError(f"{image}: not a readable image ({err})") from None
    if not isinstance(image, Image.Image):
        raise LlmoptError(f"image: expected a PIL image or a file path, got {type(image).__name__}")
    p, m, tp = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    height, width = smart_resize(image.height, image.width, p * m, min_pixels, max_pixels)
    image = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)) / 255.0
    x = (x - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)  # [H, W, C]
    x = x.permute(2, 0, 1)  # [C, H, W]
    gh, gw = height // p, width // p
    patches = x.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # gh', gw', m, m, C, p, p
    patches = patches.unsqueeze(5).expand(*patches.shape[:5], tp, p, p)  # the one frame repeated over time
    return ImageInput(patches.reshape(gh * gw, 3 * tp * p * p).contiguous(), (1, gh, gw))


def pixel_bounds(folder: Path) -> dict:
    """``min_pixels``/``max_pixels`` from the folder's preprocessor_config.json (v4 keys or v5 ``size``), if any."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return {}
    from llmopt.fsutil import read_json

    cfg = read_json(path)
    size = cfg.get("size") or {}
    bounds = {"min_pixels": cfg.get("min_pixels", size.get("shortest_edge")),
              "max_pixels": cfg.get("max_pixels", size.get("longest_edge"))}
    return {k: int(v) for k, v in bounds.items() if v is not None}


def expand_image_tokens(ids: list[int], images: list[ImageInput], args: ModelArgs) -> list[int]:
    """Replace the k-th image placeholder token with as many copies as image k has merged patches."""
    tid, merge = args.image_token_id, args.vision.spatial_merge_size
    slots = [i for i, t in enumerate(ids) if t == tid]
    if len(slots) != len(images):
        raise LlmoptError(f"prompt: {len(slots)} image placeholder(s) for {len(images)} image(s)")
    out, prev = [], 0
    for slot, img in zip(slots, images):
        out += ids[prev:slot] + [tid] * img.n_tokens(merge)
        prev = slot + 1
    return out + ids[prev:]


def mrope_positions(ids: torch.Tensor, mask: torch.Tensor, images: list[ImageInput], args: ModelArgs) -> torch.Tensor:
    """Positions ``[3, B, T]`` (temporal, height, width); padding gets 0. Images are used in prompt order."""
    B, T = ids.shape
    merge = args.vision.spatial_merge_size
    pos = torch.zeros(3, B, T, dtype=torch.int64)
    image_iter = iter(images)
    for b in range(B):
        real = mask[b].nonzero().flatten()
        is_img = (ids[b, real] == args.image_token_id).tolist()
        cols, cur, i = [], 0, 0
        while i < len(is_img):
            j = i
            while j < len(is_img) and is_img[j] == is_img[i]:
                j += 1
            if not is_img[i]:
                cols.append(torch.arange(cur, cur + j - i).expand(3, -1))
                cur += j - i
            else:
                img = next(image_iter, None)
                if img is None:
                    raise LlmoptError("prompt: more image placeholder groups than images")
                t, h, w = img.grid_thw[0], img.grid_thw[1] // merge, img.grid_thw[2] // merge
                if t * h * w != j - i:
                    raise LlmoptError(f"prompt: an image needs {t * h * w} placeholder tokens, found {j - i} in a row")
                tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
                cols.append(torch.stack([tt, hh, ww]).reshape(3, -1) + cur)
                cur += max(h, w)
            i = j
        pos[:, b, real] = torch.cat(cols, dim=1)
    return pos


def window_order(grid_thw, merge: int, window_patches: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Merge-block order that groups each window's blocks together, and the windows' (start, end) token spans."""
    t, gh, gw = grid_thw
    h, w = gh // merge, gw // merge
    unit = merge * merge
    index = torch.arange(t * h * w).reshape(t, h, w)
    pad_h, pad_w = (-h) % window_patches, (-w) % window_patches
    padded = torch.nn.functional.pad(index, (0, pad_w, 0, pad_h), value=-1)
    nh, nw = (h + pad_h) // window_patches, (w + pad_w) // window_patches
    windows = padded.reshape(t, nh, window_patches, nw, window_patches).permute(0, 1, 3, 2, 4)
    windows = windows.reshape(t * nh * nw, window_patches * window_patches)
    order, spans, start = [], [], 0
    for win in windows:
        blocks = win[win >= 0]
        if len(blocks):
            order.append(blocks)
            spans.append((start, start + len(blocks) * unit))
            start += len(blocks) * unit
    return torch.cat(order), spans


def hw_positions(grid_thw, merge: int) -> torch.Tensor:
    """(row, column) of each patch, patches listed merge block by merge block: ``[t*h*w, 2]``."""
    t, h, w = grid_thw
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    shape = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(shape).transpose(1, 2).flatten()
    cols = cols.reshape(shape).transpose(1, 2).flatten()
    return torch.stack([rows, cols], dim=-1).repeat(t, 1)


class VisionTower:
    """The Qwen2.5-VL ViT on one backend; ``tower(image) -> host float32 [n_merged_tokens, text_hidden]``."""

    def __init__(self, vargs: VisionArgs, tensors: dict, backend, folder: Path):
        self.v, self.be = vargs, backend
        hidden, p, tp, C = vargs.hidden, vargs.patch_size, vargs.temporal_patch_size, vargs.in_channels

        def get(name, shape):
            t = tensors.get("visual." + name)
            if t is None:
                raise LlmoptError(f"{folder}: tensor 'visual.{name}' is missing (expected shape {list(shape)})")
            if isinstance(t, torch.Tensor) and t.numel() == math.prod(shape) and t.dim() != len(shape):
                t = t.reshape(shape)  # the Conv3d patch embedding, flattened to a linear
            if tuple(t.shape) != tuple(shape):
                raise LlmoptError(f"{folder}: tensor 'visual.{name}' has shape {list(t.shape)}, expected {list(shape)}")
            return t

        be = backend
        self.patch = be.linear_weight("visual.patch_embed", get("patch_embed.proj.weight", (hidden, C * tp * p * p)))
        self.blocks = []
        for i in range(vargs.depth):
            b = f"blocks.{i}."
            qkv, qkv_b = get(b + "attn.qkv.weight", (3 * hidden, hidden)), get(b + "attn.qkv.bias", (3 * hidden,))
            parts = [(_rows(qkv, j * hidden, (j + 1) * hidden), qkv_b[j * hidden:(j + 1) * hidden]) for j in range(3)]
            lin = {n: be.linear_weight(f"visual.{b}{n}", get(b + f"{n}.weight", s), get(b + f"{n}.bias", s[:1]))
                   for n, s in (("attn.proj", (hidden, hidden)), ("mlp.gate_proj", (vargs.ffn, hidden)),
                                ("mlp.up_proj", (vargs.ffn, hidden)), ("mlp.down_proj", (hidden, vargs.ffn)))}
            self.blocks.append({
                "norm1": be.param(b + "norm1", get(b + "norm1.weight", (hidden,))),
                "norm2": be.param(b + "norm2", get(b + "norm2.weight", (hidden,))),
                **{n: be.linear_weight(f"visual.{b}attn.{n}", w, bias) for n, (w, bias) in zip("qkv", parts)},
                **lin,
            })
        unit = vargs.spatial_merge_size ** 2
        self.ln_q = be.param("merger.ln_q", get("merger.ln_q.weight", (hidden,)))
        self.mlp0 = be.linear_weight("merger.mlp.0", get("merger.mlp.0.weight", (hidden * unit, hidden * unit)),
                                     get("merger.mlp.0.bias", (hidden * unit,)))
        self.mlp2 = be.linear_weight("merger.mlp.2", get("merger.mlp.2.weight", (vargs.out_hidden, hidden * unit)),
                                     get("merger.mlp.2.bias", (vargs.out_hidden,)))
        self.spec = AttnSpec(vargs.n_heads, vargs.n_heads, vargs.head_dim, vargs.head_dim ** -0.5)

    def __call__(self, image: ImageInput) -> torch.Tensor:
        v, be = self.v, self.be
        unit = v.spatial_merge_size ** 2
        t, gh, gw = image.grid_thw
        n = t * gh * gw
        if image.pixel_values.shape != (n, v.in_channels * v.temporal_patch_size * v.patch_size ** 2):
            raise LlmoptError(f"image: pixel_values shape {list(image.pixel_values.shape)} does not match grid {image.grid_thw}")
        order, windows = window_order(image.grid_thw, v.spatial_merge_size, v.window_size // v.spatial_merge_size // v.patch_size)
        frames = [(f * gh * gw, (f + 1) * gh * gw) for f in range(t)]

        def permute(rows):  # reorder merge blocks (groups of `unit` rows) window by window
            return rows.reshape(n // unit, unit, -1)[order].reshape(n, -1)

        x = be.linear(be.from_host(permute(image.pixel_values.float()).unsqueeze(0)), self.patch)
        cos, sin = vision_rope_tables(v.rope_theta, permute(hw_positions(image.grid_thw, v.spatial_merge_size)), v.head_dim)
        for i, w in enumerate(self.blocks):
            h = be.rmsnorm(x, w["norm1"], 1e-6, False)
            q = be.rope(be.linear(h, w["q"]), cos, sin, v.head_dim)
            k = be.rope(be.linear(h, w["k"]), cos, sin, v.head_dim)
            a = be.attention_full(q, k, be.linear(h, w["v"]), frames if i in v.fullatt_blocks else windows, self.spec)
            x = be.add(x, be.linear(a, w["attn.proj"]))
            h = be.rmsnorm(x, w["norm2"], 1e-6, False)
            h = be.gated_act(be.linear(h, w["mlp.gate_proj"]), be.linear(h, w["mlp.up_proj"]), v.act)
            x = be.add(x, be.linear(h, w["mlp.down_proj"]))
        h = be.to_host(be.rmsnorm(x, self.ln_q, 1e-6, False)).reshape(1, n // unit, unit * v.hidden)
        h = be.linear(be.act(be.linear(be.from_host(h), self.mlp0), "gelu"), self.mlp2)
        return be.to_host(h)[0][torch.argsort(order)]


def _rows(w, start: int, end: int):
    """Rows ``start:end`` of a float or packed weight (packed rows are whole bytes, so slicing is exact)."""
    if isinstance(w, QuantizedTensor):
        return QuantizedTensor(w.qweight[start:end], w.scales[start:end],
                               None if w.zeros is None else w.zeros[start:end], w.bits, w.group,
                               (end - start, w.shape[1]), w.orig_dtype)
    return w[start:end]
