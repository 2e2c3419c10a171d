"""Attention on the Vulkan device: the KV cache, RoPE, prefill/vision attention and the fused decode attention.

``VulkanBackend`` (``llmopt.backends.vulkan.backend``) takes these ops from ``AttentionOps``. The KV cache is one
float32 key and one value buffer ``[B, max_len, n_kv * head_dim]`` a layer (sliding-window layers keep every slot
and attend to the last ``window``). Prefill (and anything else with more than one token a sequence) runs
``rope.comp`` on q and k, ``kv_store.comp`` and ``attention.comp`` (a workgroup a query head and token); the vision
tower runs ``attention.comp`` over segments (``attention_full``). A decode step runs ``rope_attention`` (the
engine's ``getattr`` hook): ``rope_attention.comp`` ropes q and k, stores this step's K/V and attends in one
dispatch, a workgroup a (KV head, chunk of the context, sequence) serving the whole GQA group, the chunks combined
by the last workgroup to finish (its docstring; docs/benchmarks.md for the H200 numbers); with ``attn_x8`` the
workgroup writing a head's outputs also writes them as x8 rows (``VkAct.q8``) for the o projection. The replayed step
(``llmopt.backends.vulkan.replay``) binds the step buffer's slot word instead of the push constant, and this step's
cos/sin rows from the same buffer as the tables. Chained (``llmopt.backends.vulkan.chain``), its workgroups load
those rows and their chunk's first cached keys and values before they wait for q+k+v, and at short contexts up to
``attn_stage_slots`` more value rows into the shared memory left (``_attn_stage``).
With ``attn_clock`` on, the decode dispatches run ``rope_attention_clock.comp`` instead (the same kernel stamping
each phase with the shader clocks, VK_KHR_shader_clock) and ``attention_clock()`` reads the stamps of the last
dispatch of each layer back (bench/vulkan_decode.py prints them as a phase table).

    be = VulkanBackend()
    cache = be.kv_cache(n_layers, batch, max_len, n_kv_heads, head_dim, windows)
    out = be.rope_attention(q, k, v, cos, sin, head_dim, cache, layer, start, valid, spec)  # q, k, v: VkAct
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from llmopt.backends.base import AttnSpec, KVCache
from llmopt.backends.vulkan.device import Buffer, Device, pack_push
from llmopt.errors import LlmoptError

if TYPE_CHECKING:
    from llmopt.backends.vulkan.backend import VkAct

MAX_HEAD_DIM = 256  # attention.comp's shared query buffer
FUSED_MAX_G, FUSED_MAX_GD, FUSED_MAX_CHUNK = 8, 1024, 256  # rope_attention.comp's shared arrays
FUSED_STAGE_PER = 4  # rope_attention.glsl's STAGE_PER: floats an invocation loads for the chained build's stage
# rope_attention_clock.comp's records (rope_attention.glsl says what each stamp and word holds)
CLOCK_PHASES = ("start", "rope q", "first key scored", "scores", "softmax", "values + partials", "arrived",
                "split weights", "combined")
CLOCK_REC = 4 * len(CLOCK_PHASES) + 4  # realtime and cycle stamps (lo, hi), arrival, flags, n_active, slots
CLOCK_ACTIVE, CLOCK_LAST, CLOCK_COMBINER, CLOCK_SINGLE = 1, 2, 4, 8  # the flags word
CLOCK_LAYERS, CLOCK_GROUPS = 128, 1024  # records kept: a region of CLOCK_GROUPS workgroups a layer


@dataclass
class VkKVCache(KVCache):
    """Per-layer key and value buffers ``[B, max_len, n_kv * head_dim]`` on the device, freed with the cache."""

    batch: int
    max_len: int
    n_kv: int
    head_dim: int
    windows: list
    k: list = field(default_factory=list)
    v: list = field(default_factory=list)
    counters: Buffer | None = None  # rope_attention.comp's arrival counters [batch * n_kv], zero between dispatches
    device: Device | None = field(default=None, repr=False)

    def __del__(self):
        if self.device is not None:
            for buf in self.k + self.v + [self.counters]:
                if buf is not None:
                    self.device.free(buf)



def _window(spec: AttnSpec, cache: VkKVCache) -> int:
    """The shaders' window push constant: the sliding window in slots, 0 where the layer sees the whole cache."""
    return spec.window if spec.window is not None and spec.window < cache.max_len else 0


class AttentionOps:
    """``VulkanBackend``'s attention ops (see the module docstring)."""

    def _init_attention(self, probe: dict) -> None:
        """The fused decode attention's settings (attributes, so a benchmark may vary them): on or off, its
        workgroup size, the fewest slots a split takes, and the workgroups a dispatch aims at (splits over the KV
        length). On an H200 (docs/benchmarks.md) 1024 invocations beat 512 and 256; chunks of 16 slots (~64 at 2k
        slots, where the target of 128 workgroups caps the splits) beat 8, 24, 32 and 64 at contexts ~150-280 on an
        H100 in the chained step with its staged values (v26: 1.01-1.02x over 32, which the H200 preferred before
        v20's early loads); CPU devices run one workgroup a KV head up to 256 slots."""
        self.fuse_rope_attention = True
        self.attn_wg = self.wg_reduce
        self.attn_chunk_min = 16
        self.attn_prefetch = True  # rope_attention issues its first key and value loads beside q's (PREFETCH)
        self.attn_x8 = True  # rope_attention also writes its output as x8 rows for the o projection (with matvec_x_q8)
        # chained (chain.py), rope_attention issues its loads ahead before the wait for q+k+v, and at short contexts
        # stages up to this many more cached value rows in the shared memory left (STAGE; 0: none); v20, H100: 1.06x
        self.attn_stage_slots = FUSED_MAX_CHUNK
        self.attn_split_target = 1 if probe["device"].get("type") == "cpu" else 128
        self.attn_clock = False  # decode dispatches stamp their phases (rope_attention_clock; attention_clock())
        self._clock_buf: Buffer | None = None
        self._clock_grids: dict[int, tuple[int, int, int]] = {}  # layer -> the grid its records were written by

    def attention_clock(self) -> dict[int, dict[str, np.ndarray]]:
        """Per layer (the layers dispatched with ``attn_clock`` on), the stamps of its last fused decode dispatch,
        a row a workgroup in grid order (sequence, split, KV head): ``realtime_ns`` and ``cycles`` [groups,
        len(CLOCK_PHASES)] (int64; 0 where the workgroup did not reach that stamp: see ``flags``), ``arrival``
        (the order its partials arrived in; -1 for inactive or single-split workgroups), ``flags`` (CLOCK_*),
        ``n_active``, ``slots``, and the workgroup's ``kv_head``, ``split``, ``seq``."""
        if self._clock_buf is None:
            raise LlmoptError("attention_clock: no decode attention ran with attn_clock on")
        self.synchronize()
        n = len(CLOCK_PHASES)
        out = {}
        for layer, (kv, splits, batch) in sorted(self._clock_grids.items()):
            groups = kv * splits * batch
            rec = self.dev.download(self._clock_buf, 4 * groups * CLOCK_REC, np.uint32,
                                    4 * layer * CLOCK_GROUPS * CLOCK_REC).reshape(groups, CLOCK_REC).astype(np.int64)
            stamps = rec[:, :4 * n:2] | (rec[:, 1:4 * n:2] << 32)
            seq, split, head = np.unravel_index(np.arange(groups), (batch, splits, kv))
            arrival = rec[:, 4 * n].astype(np.uint32).astype(np.int64)
            out[layer] = {"realtime_ns": stamps[:, :n], "cycles": stamps[:, n:],
                          "arrival": np.where(arrival == 0xFFFFFFFF, -1, arrival), "flags": rec[:, 4 * n + 1],
                          "n_active": rec[:, 4 * n + 2], "slots": rec[:, 4 * n + 3],
                          "kv_head": head, "split": split, "seq": seq}
        return out

    def _clock_binding(self, layer: int, groups: tuple[int, int, int]) -> tuple[tuple, int]:
        """rope_attention_clock's record buffer and the first word of ``layer``'s records."""
        if not self.dev.features.get("shader_clock"):
            raise LlmoptError(f"attn_clock: device '{self.dev.info['name']}' lacks VK_KHR_shader_clock with device "
                              f"and subgroup clocks (the phase stamps of rope_attention_clock.comp)")
        n_groups = groups[0] * groups[1] * groups[2]
        if layer >= CLOCK_LAYERS or n_groups > CLOCK_GROUPS:
            raise LlmoptError(f"attn_clock: layer {layer} with {n_groups} workgroups a dispatch; the phase records "
                              f"hold {CLOCK_LAYERS} layers of {CLOCK_GROUPS} workgroups")
        if self._clock_buf is None:
            self._clock_buf = self.dev.buffer(4 * CLOCK_LAYERS * CLOCK_GROUPS * CLOCK_REC, name="attention clock")
        self._clock_grids[layer] = groups
        return self._whole(self._clock_buf), layer * CLOCK_GROUPS * CLOCK_REC

    def kv_cache(self, n_layers, batch, max_len, n_kv_heads, head_dim, windows):
        nbytes = 4 * batch * max_len * n_kv_heads * head_dim
        if nbytes > self.dev.max_range:
            raise LlmoptError(f"KV cache layer of {nbytes / 2**20:.0f} MiB (batch {batch} x {max_len} slots) exceeds the "
                              f"device's storage-buffer range {self.dev.max_range / 2**20:.0f} MiB; lower max_len or batch")
        cache = VkKVCache(batch, max_len, n_kv_heads, head_dim, list(windows), device=self.dev)
        cache.counters = self.dev.buffer(4 * batch * n_kv_heads, name="attention counters")
        self.dev.upload(cache.counters, np.zeros(batch * n_kv_heads, np.uint32))
        for i in range(n_layers):
            cache.k.append(self.dev.buffer(nbytes, name=f"kv cache layer {i}"))
            cache.v.append(self.dev.buffer(nbytes, name=f"kv cache layer {i}"))
        return cache

    def rope(self, x, cos, sin, head_dim):
        if x.features % head_dim or head_dim % 2 or tuple(cos.shape) != (*x.shape[:-1], head_dim) or cos.shape != sin.shape:
            raise LlmoptError(f"rope: tables {list(cos.shape)}/{list(sin.shape)} do not fit x {list(x.shape)} "
                              f"with head_dim {head_dim}")
        return self._rope(x, self._upload_host(cos, np.float32), self._upload_host(sin, np.float32), head_dim)

    def _rope(self, x: VkAct, cos: Buffer, sin: Buffer, head_dim: int, pos: tuple | None = None) -> VkAct:
        """RoPE with device tables: one row per row of ``x``, or (``pos`` bound) rows of a table of every
        position, picked by the uint32 position of each row of ``x`` that ``pos`` holds."""
        out = self._new(x.shape)
        total = x.rows * x.features // 2
        self._run("rope", 5, (int(pos is not None),), [self._whole(x.buf), self._whole(cos), self._whole(sin),
                                                      self._whole(out.buf), pos or self._whole(self.dummy)],
                  pack_push("III", x.features, head_dim, total), self._grid(-(-total // self.wg)))
        return out

    def attention(self, q, k, v, cache: VkKVCache, layer, start, valid, spec: AttnSpec):
        B, T, _ = q.shape
        self._check_attn(q, k, v, spec)
        if start + T > cache.max_len:
            raise LlmoptError(f"attention: positions {start}..{start + T - 1} exceed the KV cache of {cache.max_len}")
        mask_len = start + T
        mask = self._upload_host(valid[:, :mask_len].to(torch.int32), np.uint32) if valid is not None else None
        return self._cached_attention(q, k, v, cache, layer, start, mask, mask_len, spec)

    def _cached_attention(self, q, k, v, cache: VkKVCache, layer: int, start: int, mask: Buffer | None,
                          mask_len: int, spec: AttnSpec, slot: tuple | None = None) -> VkAct:
        """Store this step's K/V at cache slot ``start`` (or, ``slot`` bound: the uint32 slot it holds, read on
        the device) and attend causally; ``mask`` holds valid flags ``[B, mask_len]`` (None: every slot)."""
        B, T, _ = q.shape
        kv_f = spec.n_kv_heads * spec.head_dim
        total = B * T * kv_f
        step = slot or self._whole(self.dummy)
        self._run("kv_store", 5, (int(slot is not None),),
                  [self._whole(k.buf), self._whole(v.buf), self._whole(cache.k[layer]), self._whole(cache.v[layer]), step],
                  pack_push("IIIII", T, kv_f, cache.max_len, start, total), self._grid(-(-total // self.wg)))
        window = _window(spec, cache)
        scratch_len = cache.max_len if slot is not None else start + T
        return self._attend(q, cache.k[layer], cache.v[layer], mask or self.dummy, spec, cache.max_len, start, window,
                            0, int(mask is not None), mask_len, scratch_len, slot)

    def attention_full(self, q, k, v, segments, spec):
        B, T, _ = q.shape
        self._check_attn(q, k, v, spec)
        bounds = torch.zeros(T, 2, dtype=torch.int64)
        covered = 0
        for s, e in segments:
            if not 0 <= s < e <= T:
                raise LlmoptError(f"attention_full: segment ({s}, {e}) outside 0..{T}")
            bounds[s:e, 0], bounds[s:e, 1] = s, e
            covered += e - s
        if covered != T:
            raise LlmoptError(f"attention_full: segments cover {covered} of {T} tokens (they must tile the sequence)")
        seg = self._upload_host(bounds, np.uint32)
        return self._attend(q, k.buf, v.buf, seg, spec, T, 0, 0, 1, 0, 0, T, None)

    def _check_attn(self, q, k, v, spec: AttnSpec) -> None:
        if spec.head_dim > MAX_HEAD_DIM or spec.n_heads % spec.n_kv_heads:
            raise LlmoptError(f"attention: head_dim {spec.head_dim} (max {MAX_HEAD_DIM}) with {spec.n_heads} heads "
                              f"over {spec.n_kv_heads} kv heads is not supported")
        if q.features != spec.n_heads * spec.head_dim or k.shape != v.shape or k.features != spec.n_kv_heads * spec.head_dim:
            raise LlmoptError(f"attention: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} do not match {spec}")

    def _attend(self, q, kbuf, vbuf, aux, spec, L, start, window, mode, has_mask, mask_len, scratch_len, slot):
        B, T, _ = q.shape
        out = self._new(q.shape)
        scratch = self._alloc(4 * B * T * spec.n_heads * scratch_len, "attention scratch")
        push = pack_push("IIIIIIIIIIIff", T, spec.n_heads, spec.n_kv_heads, spec.head_dim, L, start, window, mode,
                         has_mask, mask_len, scratch_len, float(spec.scale), float(spec.softcap or 0.0))
        self._run("attention", 7, (int(slot is not None),),
                  [self._whole(q.buf), self._whole(kbuf), self._whole(vbuf), self._whole(aux), self._whole(scratch),
                   self._whole(out.buf), slot or self._whole(self.dummy)], push, (spec.n_heads, T, B))
        self._release(scratch)
        return out

    def rope_attention(self, q, k, v, cos, sin, head_dim, cache: VkKVCache, layer, start, valid, spec: AttnSpec):
        """``attention(rope(q), rope(k), v, ...)``: for a decode step (one token a sequence) one dispatch that ropes,
        stores this step's K/V and attends (``rope_attention.comp``); otherwise (prefill, ``fuse_rope_attention``
        off, a group too large for its shared memory) rope, rope, attention."""
        if not self._fusable(q, spec, cache):
            return self.attention(self.rope(q, cos, sin, head_dim), self.rope(k, cos, sin, head_dim), v, cache, layer,
                                  start, valid, spec)
        B = q.shape[0]
        if head_dim != spec.head_dim or tuple(cos.shape) != (B, 1, head_dim) or cos.shape != sin.shape:
            raise LlmoptError(f"rope_attention: tables {list(cos.shape)}/{list(sin.shape)} do not fit q {list(q.shape)} "
                              f"with head_dim {head_dim}")
        self._check_attn(q, k, v, spec)
        if start >= cache.max_len:
            raise LlmoptError(f"attention: position {start} exceeds the KV cache of {cache.max_len}")
        mask = self._upload_host(valid[:, :start + 1].to(torch.int32), np.uint32) if valid is not None else None
        return self._rope_attend(q, k, v, self._whole(self._upload_host(cos, np.float32)),
                                 self._whole(self._upload_host(sin, np.float32)), cache, layer, start, mask, start + 1,
                                 spec)

    def _fusable(self, q: VkAct, spec: AttnSpec, cache: VkKVCache) -> bool:
        """Whether ``rope_attention.comp`` serves this step: one token a sequence, a group and head that fit its
        shared arrays, and a context it can split into chunks of at most FUSED_MAX_CHUNK slots."""
        group = spec.n_heads // spec.n_kv_heads
        return (self.fuse_rope_attention and q.shape[1] == 1 and spec.n_heads % spec.n_kv_heads == 0
                and group <= FUSED_MAX_G and group * spec.head_dim <= FUSED_MAX_GD and spec.head_dim % 2 == 0
                and spec.head_dim <= MAX_HEAD_DIM and self._splits(spec, cache, q.shape[0]) <= FUSED_MAX_CHUNK
                and self._fused_shared_bytes(1) <= self._shared_limit())

    def _fused_shared_bytes(self, x8_len: int) -> int:
        """rope_attention.comp's shared memory with an x8 staging array (``x8_vals``) of ``x8_len`` floats."""
        return 4 * (FUSED_MAX_GD + 2 * MAX_HEAD_DIM + FUSED_MAX_G * (FUSED_MAX_CHUNK + 2) + self.attn_wg + 1 + x8_len)

    def _attn_out(self, q: VkAct, spec: AttnSpec) -> tuple[VkAct, tuple]:
        """The fused attention's output and its (Q8, X8_LEN) specialization: x8 rows (``q8``) where ``attn_x8`` is on,
        the other producers' conditions hold (``VulkanBackend._normed``: ``matvec_x_q8``, int-dot, decode rows) and
        the head dimension is a multiple of 32, so the G * D outputs of a workgroup are whole chunks; and where its
        staging array still fits the device's shared memory."""
        per = spec.n_heads // spec.n_kv_heads * spec.head_dim
        fits = self._fused_shared_bytes(per + per // 32) <= self._shared_limit()
        return self._normed(q.shape, per if self.attn_x8 and spec.head_dim % 32 == 0 and fits else None)

    def _attn_stage(self, head_dim: int, x8_len: int) -> int:
        """Floats of the chained build's ``stage`` (rope_attention.glsl's STAGE): whole value rows, at most
        ``attn_stage_slots`` of them and FUSED_STAGE_PER floats an invocation, in what the device's shared memory has
        left beside the kernel's other arrays (less 16 bytes: chain.glsl's word); 1 (an array's least) for none."""
        left = (self._shared_limit() - self._fused_shared_bytes(x8_len) - 16) // 4
        rows = min(self.attn_stage_slots, self.attn_wg * FUSED_STAGE_PER // head_dim, left // head_dim)
        return max(1, rows * head_dim)

    def _splits(self, spec: AttnSpec, cache: VkKVCache, batch: int) -> int:
        """Splits over the KV length (the grid's y): enough that no chunk exceeds FUSED_MAX_CHUNK slots at the longest
        context the cache allows, and up to ``attn_split_target`` workgroups a dispatch where contexts allow
        chunks of ``attn_chunk_min`` slots."""
        if not 1 <= self.attn_chunk_min <= FUSED_MAX_CHUNK:
            raise LlmoptError(f"attn_chunk_min {self.attn_chunk_min}: expected 1..{FUSED_MAX_CHUNK}")
        span = min(spec.window or cache.max_len, cache.max_len)
        wanted = min(-(-self.attn_split_target // (spec.n_kv_heads * batch)), -(-span // self.attn_chunk_min))
        return max(1, wanted, -(-span // FUSED_MAX_CHUNK))

    def _rope_attend(self, q, k, v, cos: tuple, sin: tuple, cache: VkKVCache, layer: int, start: int,
                     mask: Buffer | None, mask_len: int, spec: AttnSpec, step: tuple | None = None) -> VkAct:
        """Record ``rope_attention.comp`` for one token a sequence at cache slot ``start`` (or, ``step`` bound: the
        uint32 slot it holds, read on the device); the ``cos``/``sin`` bindings hold this step's row of each sequence
        (the replayed step binds regions of its step buffer)."""
        B, _, _ = q.shape
        group = spec.n_heads // spec.n_kv_heads
        splits = self._splits(spec, cache, B)
        window = _window(spec, cache)
        out, x8 = self._attn_out(q, spec)
        part = self._alloc(4 * B * spec.n_kv_heads * splits * group * (spec.head_dim + 2), "attention partials") \
            if splits > 1 else self.dummy
        grid = (spec.n_kv_heads, splits, B)
        bindings = [self._whole(q.buf), self._whole(k.buf), self._whole(v.buf), cos, sin]
        bufs = [cache.k[layer], cache.v[layer], mask or self.dummy, part, cache.counters, out.buf]
        bindings += [self._whole(b) for b in bufs] + [step or self._whole(self.dummy), self._whole(out.q8 or self.dummy)]
        clock_base = 0
        if self.attn_clock:
            clock, clock_base = self._clock_binding(layer, grid)
            bindings.append(clock)
        push = pack_push("IIIIIIIIIffI", spec.n_heads, spec.n_kv_heads, spec.head_dim, cache.max_len, start, window,
                         int(mask is not None), mask_len, self.attn_chunk_min, float(spec.scale),
                         float(spec.softcap or 0.0), clock_base)
        self._run("rope_attention_clock" if self.attn_clock else "rope_attention", len(bindings),
                  (*x8, int(step is not None), int(self.attn_prefetch), self._attn_stage(spec.head_dim, x8[1])),
                  bindings, push, grid, self.attn_wg)
        if part is not self.dummy:
            self._release(part)
        return out
