"""CpuBackend: the float32 torch reference every other backend is checked against, plus fast quantized paths.

Two modes, chosen at construction:

- ``quant="reference"``: every packed weight is dequantized once (``QuantizedTensor.dequantize()``) to float32;
  all ops are plain float32 torch. This is the reference for the Vulkan/NPU/IREE backends.
- ``quant="fast"`` (default): 4-bit weights are repacked at load into torch's CPU int4 tiling and multiplied by
  ``aten._weight_int4pack_mm_for_cpu`` (group-wise scales and zero points); 8-bit per-channel weights use
  ``aten._weight_int8pack_mm``; other shapes (2/3-bit, 8-bit group-wise, N not a multiple of 16) are dequantized
  at load to ``lowbit_dtype`` (bfloat16 by default: half the bytes of float32 for a memory-bound decode).
  The kernels take their input in ``kernel_dtype``: bfloat16 by default, because torch's float32 variants of both
  kernels are 40-100x slower on this AVX-512 CPU (measured, docs/benchmarks.md); ``kernel_dtype=torch.float32``
  gives results exact to float rounding against ``dequantize()``. Everything else (norms, attention, residual
  stream, KV cache) stays float32. The int4 repack is cached on disk (``$LLMOPT_CACHE/repack``).

``bench/engine_cpu.py`` measures the choices. The same class runs on CUDA (``llmopt.backends.cuda``) by
swapping the device and the int4 kernel.

    python -m llmopt.backends.cpu    # prints probe()
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmopt.backends.base import AttnSpec, Backend, KVCache
from llmopt.errors import LlmoptError
from llmopt.quant.format import QuantizedTensor

_INT4_GROUPS = (256, 128, 64, 32)  # group sizes torch's int4 kernels accept, largest first



class TorchKVCache(KVCache):
    """Per-layer key/value tensors ``[B, n_kv, slots, head_dim]``.

    Global layers keep ``max_len`` slots addressed by position. Sliding-window layers keep a ring of ``window``
    slots (slot = position % window) and remember which position each slot holds (``slot_pos``, -1 = empty),
    so attention masks by position and the cache never grows past the window."""

    def __init__(self, n_layers, batch, max_len, n_kv_heads, head_dim, windows, device, dtype):
        self.batch, self.max_len, self.windows = batch, max_len, list(windows)
        self.k, self.v, self.slot_pos = [], [], []
        for i in range(n_layers):
            w = self.windows[i]
            slots = max_len if w is None or w >= max_len else w
            if slots < max_len:
                self.slot_pos.append(torch.full((slots,), -1, dtype=torch.int64, device=device))
            else:
                self.windows[i] = None  # a window as long as the context is a global layer
                self.slot_pos.append(None)
            self.k.append(torch.zeros(batch, n_kv_heads, slots, head_dim, device=device, dtype=dtype))
            self.v.append(torch.zeros(batch, n_kv_heads, slots, head_dim, device=device, dtype=dtype))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class QLinear:
    """An uploaded linear layer: ``kind`` says which kernel runs it."""

    def __init__(self, kind: str, out_features: int, weight, bias=None, group=0, aux=None):
        self.kind, self.out_features, self.weight, self.bias, self.group, self.aux = kind, out_features, weight, bias, group, aux

    @property
    def nbytes(self) -> int:
        tensors = [t for t in (self.weight, self.bias, self.aux) if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, quant: str = "fast", lowbit_dtype: torch.dtype | str = torch.bfloat16,
                 kernel_dtype: torch.dtype | str = torch.bfloat16, device: str = "cpu", threads: int | None = None,
                 repack_cache: str | os.PathLike | None = "auto"):
        if quant not in ("fast", "reference"):
            raise LlmoptError(f"{self.name} backend: quant={quant!r} (expected 'fast' or 'reference')")
        self.quant = quant
        self.lowbit_dtype = getattr(torch, lowbit_dtype) if isinstance(lowbit_dtype, str) else lowbit_dtype
        self.kernel_dtype = getattr(torch, kernel_dtype) if isinstance(kernel_dtype, str) else kernel_dtype
        self.device = torch.device(device)
        self.dtype = torch.float32
        self.repack_seconds = 0.0  # time spent converting packed weights at load (reported by benchmarks)
        if repack_cache == "auto":  # $LLMOPT_CACHE/repack, the project's cache root
            repack_cache = Path(os.environ.get("LLMOPT_CACHE") or Path.home() / ".cache" / "llmopt") / "repack"
        self.repack_cache = Path(repack_cache) if repack_cache else None  # None: always repack
        self.repack_cache_hits = 0
        self.kinds: dict[str, int] = {}  # linear kernel -> count, for reports
        if threads:
            torch.set_num_threads(threads)

    # --- weights ---------------------------------------------------------------------------------
    def param(self, name, tensor):
        return tensor.to(self.device, self.dtype).contiguous()

    def embedding_table(self, name, weight):
        if isinstance(weight, QuantizedTensor) and self.quant == "fast":
            return weight  # stays packed: only the gathered rows are dequantized, per call
        return self._dense(weight, self.dtype)

    def linear_weight(self, name, weight, bias=None):
        bias = None if bias is None else bias.to(self.device, self.dtype).contiguous()
        t0 = time.perf_counter()
        out = weight.shape[0]
        if not isinstance(weight, QuantizedTensor) or self.quant == "reference":
            lin = QLinear("dense", out, self._dense(weight, self.dtype), bias)
        elif weight.bits == 4 and out % 16 == 0 and self._int4_group(weight) is not None:
            lin = self._int4_linear(weight, bias)
        elif weight.bits == 8 and weight.group == weight.shape[1] and weight.sym:
            codes = (weight.unpacked().to(torch.int16) - 128).to(torch.int8)
            lin = QLinear("int8pack", out, codes.to(self.device).contiguous(), bias,
                          aux=weight.scales.to(self.device, self.kernel_dtype).flatten().contiguous())
        else:
            lin = QLinear(f"dense-{str(self.lowbit_dtype).removeprefix('torch.')}", out,
                          self._dense(weight, self.lowbit_dtype), bias)
        self.repack_seconds += time.perf_counter() - t0
        self.kinds[lin.kind] = self.kinds.get(lin.kind, 0) + 1
        return lin

    def _dense(self, weight, dtype):
        w = weight.dequantize(torch.float32) if isinstance(weight, QuantizedTensor) else weight
        return w.to(self.device, dtype).contiguous()

    @staticmethod
    def _int4_group(qt: QuantizedTensor) -> int | None:
        """The kernel group size: the format's group, or a divisor of it with scales repeated (exact)."""
        return next((g for g in _INT4_GROUPS if qt.group % g == 0), None)

    @staticmethod
    def _int4_scales_zeros(qt: QuantizedTensor, group: int) -> torch.Tensor:
        """torch's int4 kernels compute ``(q - 8) * s + z``; ours is ``(q - zero) * s``, so ``z = (8 - zero) * s``."""
        s = qt.scales.float()
        zero = torch.full_like(s, 8.0) if qt.zeros is None else qt.zeros.float()
        sz = torch.stack([s, (8.0 - zero) * s], dim=-1)  # [N, in/qt.group, 2]
        sz = sz.repeat_interleave(qt.group // group, dim=1)  # [N, in/group, 2]
        return sz.transpose(0, 1).contiguous()  # [in/group, N, 2]

    def _int4_linear(self, qt, bias):
        group = self._int4_group(qt)
        packed = self._cached_repack(qt, lambda: torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            qt.unpacked().to(torch.int32), 1))
        sz = self._int4_scales_zeros(qt, group).to(self.kernel_dtype)
        return QLinear("int4pack", qt.shape[0], packed, bias, group, sz)

    def _cached_repack(self, qt: QuantizedTensor, convert) -> torch.Tensor:
        """``convert()``'s device tiling of ``qt``, cached on disk by content (the tiling depends on torch and the
        CPU's ISA, so both are part of the key): a 270M model's repack takes seconds, reading the cache far less."""
        if self.repack_cache is None:
            return convert()
        from safetensors.torch import load_file, save_file

        from llmopt.fsutil import atomic_path

        digest = hashlib.blake2b(qt.qweight.numpy().tobytes(), digest_size=16)
        digest.update(f"{qt.shape}|{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}".encode())
        path = self.repack_cache / f"int4pack-{digest.hexdigest()}.safetensors"
        if path.is_file():
            self.repack_cache_hits += 1
            return load_file(str(path))["packed"]
        packed = convert()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({"packed": packed.contiguous()}, str(tmp))
        except OSError:  # a read-only or full cache only costs speed
            pass
        return packed

    # --- activations -----------------------------------------------------------------------------
    def from_host(self, x):
        return x.to(self.device, self.dtype)

    def to_host(self, x):
        return x.to("cpu", torch.float32)

    def kv_cache(self, n_layers, batch, max_len, n_kv_heads, head_dim, windows):
        return TorchKVCache(n_layers, batch, max_len, n_kv_heads, head_dim, windows, self.device, self.dtype)

    # --- ops -------------------------------------------------------------------------------------
    def embedding(self, ids, table, scale=1.0):
        ids = ids.to(self.device)
        if isinstance(table, QuantizedTensor):  # packed table: dequantize the gathered rows only
            flat = ids.flatten().to(table.qweight.device)
            rows = QuantizedTensor(table.qweight[flat].cpu(), table.scales[flat].cpu(),
                                   None if table.zeros is None else table.zeros[flat].cpu(),
                                   table.bits, table.group, (flat.numel(), table.shape[1]))
            x = rows.dequantize(torch.float32).to(self.device).view(*ids.shape, -1)
        else:
            x = F.embedding(ids, table).to(self.dtype)
        return x * scale if scale != 1.0 else x

    def linear(self, x, w: QLinear):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if w.kind == "dense":
            y = F.linear(x2, w.weight, w.bias)
        else:
            if w.kind == "int4pack":
                y = self._int4_mm(x2.to(self.kernel_dtype), w).to(self.dtype)
            elif w.kind == "int8pack":
                y = torch.ops.aten._weight_int8pack_mm(x2.to(self.kernel_dtype), w.weight, w.aux).to(self.dtype)
            else:  # low-precision dense
                y = F.linear(x2.to(w.weight.dtype), w.weight).to(self.dtype)
            if w.bias is not None:
                y = y + w.bias
        return y.view(*shape[:-1], w.out_features)

    def _int4_mm(self, x2, w):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w.weight, w.group, w.aux)

    def rmsnorm(self, x, weight, eps, unit_offset, group=None):
        shape = x.shape
        if group is not None:
            x = x.view(*shape[:-1], shape[-1] // group, group)
        # written out: F.rms_norm decomposes into ~16 ops on CPU (two dtype copies), this is 6
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return (y * (1.0 + weight) if unit_offset else y * weight).view(shape)

    def layernorm(self, x, weight, bias, eps):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    def add(self, a, b):
        return a + b

    def rope(self, x, cos, sin, head_dim):
        B, T, F_ = x.shape
        x = x.view(B, T, F_ // head_dim, head_dim)
        cos = cos.to(self.device, self.dtype).unsqueeze(2)
        sin = sin.to(self.device, self.dtype).unsqueeze(2)
        half = head_dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos + rotated * sin).view(B, T, F_)

    def attention(self, q, k, v, cache: TorchKVCache, layer, start, valid, spec: AttnSpec):
        B, T, _ = q.shape
        hd = spec.head_dim
        q = q.view(B, T, spec.n_heads, hd).transpose(1, 2)
        k = k.view(B, T, spec.n_kv_heads, hd).transpose(1, 2)
        v = v.view(B, T, spec.n_kv_heads, hd).transpose(1, 2)
        if start + T > cache.max_len:
            raise LlmoptError(f"attention: positions {start}..{start + T - 1} exceed the KV cache of {cache.max_len}")
        ring, ck, cv = cache.slot_pos[layer], cache.k[layer], cache.v[layer]
        # Position tensors are built only where a mask needs them: a decode step without padding makes none.
        if ring is None:  # global layer: write, then attend over slots 0 .. start+T-1
            ck[:, :, start:start + T], cv[:, :, start:start + T] = k, v
            keys, values = ck[:, :, :start + T], cv[:, :, :start + T]
            k_pos = None  # slot = position; built below only if a padding mask needs it
            allowed = None if T == 1 else torch.ones(T, start + T, dtype=torch.bool, device=self.device).tril(start)
        elif T == 1:  # sliding decode: after writing, the ring holds exactly the window ending at this token
            slot = start % cache.windows[layer]
            ck[:, :, slot:slot + 1], cv[:, :, slot:slot + 1] = k, v
            ring[slot] = start
            keys, values, k_pos = ck, cv, ring
            allowed = None if start + 1 >= ring.numel() else (ring >= 0)[None, :]
        else:  # sliding prefill: attend over the ring (older positions) plus this step's keys, then write
            window = cache.windows[layer]
            q_pos = torch.arange(start, start + T, device=self.device)
            keys, values = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
            k_pos = torch.cat([ring, q_pos])
            kp, qp = k_pos[None, :], q_pos[:, None]
            allowed = (kp <= qp) & (kp > qp - window) & (kp >= 0)
            keep = min(T, window)  # the last `window` positions of this step go into the ring
            slots = q_pos[T - keep:] % window
            ck[:, :, slots], cv[:, :, slots] = k[:, :, T - keep:], v[:, :, T - keep:]
            ring[slots] = q_pos[T - keep:]
        mask = None if allowed is None else allowed[None, None]  # [1, 1, T, S]
        if valid is not None:
            # Padding keys are excluded; each query still sees itself so padded rows stay finite (their
            # outputs are never used, but a NaN there would leak through 0 * NaN in later layers).
            kpos = torch.arange(start + T, device=self.device) if k_pos is None else k_pos
            qpos = torch.arange(start, start + T, device=self.device)
            key_valid = valid.to(self.device)[:, kpos.clamp(min=0)] & (kpos >= 0)[None, :]
            pad_mask = (key_valid[:, None, :] | (kpos[None, :] == qpos[:, None])[None])[:, None]  # [B, 1, T, S]
            mask = pad_mask if mask is None else mask & pad_mask
        out = self._attend(q, keys, values, mask, spec)
        return out.transpose(1, 2).reshape(B, T, spec.n_heads * hd)

    def _attend(self, q, k, v, mask, spec: AttnSpec):
        """Softmax attention of ``q [B,H,T,d]`` over ``k, v [B,Hkv,S,d]`` with boolean ``mask``, GQA by grouping."""
        B, H, T, d = q.shape
        group = H // spec.n_kv_heads
        if spec.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.scale, enable_gqa=group > 1)
        qg = q.reshape(B, spec.n_kv_heads, group * T, d)
        scores = (qg @ k.transpose(-1, -2)).view(B, spec.n_kv_heads, group, T, -1) * spec.scale
        scores = spec.softcap * torch.tanh(scores / spec.softcap)
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(B, spec.n_kv_heads, group * T, -1)
        return (probs @ v).view(B, H, T, d)

    def attention_full(self, q, k, v, segments, spec):
        B, T, _ = q.shape
        hd = spec.head_dim
        q = q.view(B, T, spec.n_heads, hd).transpose(1, 2)
        k = k.view(B, T, spec.n_kv_heads, hd).transpose(1, 2)
        v = v.view(B, T, spec.n_kv_heads, hd).transpose(1, 2)
        outs = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], scale=spec.scale,
                                               enable_gqa=spec.n_heads != spec.n_kv_heads) for s, e in segments]
        return torch.cat(outs, dim=2).transpose(1, 2).reshape(B, T, spec.n_heads * hd)

    def gated_act(self, gate, up, kind):
        return self.act(gate, kind) * up

    def act(self, x, kind):
        if kind == "silu":
            return F.silu(x)
        if kind == "gelu_tanh":
            return F.gelu(x, approximate="tanh")
        if kind == "gelu":
            return F.gelu(x)
        if kind == "quick_gelu":
            return x * torch.sigmoid(1.702 * x)
        raise LlmoptError(f"{self.name} backend: activation {kind!r} is not supported")

    def logits(self, x, head, softcap=None):
        y = self.linear(x[:, -1:], head)[:, 0].to("cpu", torch.float32)
        return softcap * torch.tanh(y / softcap) if softcap else y


def probe() -> dict:
    """The CPU is always present; report its features (ISA flags that matter to the kernels) and threads."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "fma")
    return {
        "present": True,
        "reason": "the host CPU runs torch",
        "device": {"name": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                   "machine": platform.machine()},
        "features": {"torch": torch.__version__, **{f: f in flags for f in wanted},
                     "int4pack_mm": hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")},
    }


if __name__ == "__main__":
    print(json.dumps(probe(), indent=2))
    sys.exit(0)
