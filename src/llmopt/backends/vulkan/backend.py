"""VulkanBackend: llmopt's Backend ops as our GLSL compute shaders (``shaders/``), on any Vulkan 1.1 device.

    from llmopt.backends.vulkan import VulkanBackend
    be = VulkanBackend()                      # compiles changed shaders into ~/.cache/llmopt/vulkan/<device>/
    be = VulkanBackend(kernel_dir="results/kernels/vulkan")   # SPIR-V from the compile stage (checked fresh)

Activations (``VkAct``) are float32 device buffers ``[B, T, F]`` from a size-keyed pool: a handle's buffer
returns to the pool when Python drops the handle, and since consecutive recorded commands are separated by
barriers, reusing it later in the same command buffer is safe. Ops only record; ``to_host``, ``logits``,
``argmax`` and ``synchronize`` submit, so a whole decode step is one command buffer. Weights stay in the packed
format on the device (int2/3/4/8 codes as 32-bit words, fp16/bf16 scales); a weight or table larger than the
device's storage-buffer range is split into row pieces, one dispatch each. ``linears`` runs q/k/v (and gate/up)
as one mat-vec over their rows concatenated on the device; where the probe says packed 4x8-bit integer dot
products are accelerated, int2/4/8 mat-vecs run ``matvec_quant_idot`` (x quantized to int8 per 32 values,
``int8_chunks`` is its reference); with ``matvec_x_q8`` the ops that feed them at decode (rmsnorm, add_rmsnorm,
gated_act, the fused decode attention) also write their output so quantized (``VkAct.q8``, ``shaders/x8.glsl``),
which int4 mat-vecs read instead of quantizing x in every workgroup. ``gated_linears`` (``fuse_gated_act``) runs
gate/up and the gated activation as one mat-vec (``gated_layout``), which also writes the down projection's x8 rows
(no gated_act dispatch). The norms come from ``llmopt.backends.vulkan.norms`` (``NormOps``); the KV cache (on the
device), RoPE and attention from ``llmopt.backends.vulkan.attention`` (``AttentionOps``; a decode step's RoPE, K/V
store and attention are one dispatch, ``rope_attention``). Host tables (RoPE cos/sin, masks, token ids) are
uploaded once per submission and reused by every layer that passes the same tensor. ``replay_decoder`` records a model's whole decode step once and replays it per
token (``llmopt.backends.vulkan.replay``; ``Model.decode_step`` uses it by itself); ``add_rmsnorm`` fuses the
residual add with the norm after it, ``norm_add_rmsnorm`` also Gemma's post norm before the add (one dispatch for
rmsnorm, add, rmsnorm), each row held in registers where it fits (``norm_regs_max``); ``linear_add_rmsnorm``
(``llmopt.backends.vulkan.producer_norm``) folds the residual add and the next norm into the o and down mat-vecs,
``linear_norm_add_rmsnorm`` Gemma's sandwich post norm as well.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmopt.backends.base import Backend
from llmopt.backends.vulkan import compile as vk_compile
from llmopt.backends.vulkan.attention import AttentionOps
from llmopt.backends.vulkan.device import Buffer, Device, pack_push, probe
from llmopt.backends.vulkan.greedy import GreedyOps
from llmopt.backends.vulkan.norms import NormOps
from llmopt.backends.vulkan.producer_norm import ProducerNormOps
from llmopt.errors import LlmoptError
from llmopt.quant.format import QuantizedTensor

MAX_GROUPS = 65535  # workgroups per grid dimension every device supports; wider grids fold into y
MATVEC_MAX_M = 8  # up to this many input rows the weights are streamed once per row (decode); beyond, tiled matmul
VULKAN_BITS = (2, 3, 4, 8)  # packed widths the shaders decode (format.SUPPORTED_BITS adds 5 and 6)
ACT_KINDS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "quick_gelu": 3}
ROW_SHADERS = {"rmsnorm", "add_rmsnorm", "layernorm", "attention", "argmax"}  # one workgroup a row/head: sized by wg_reduce


# decoder weights by the part of their (HF) name that says what they do: a mat-vec or mat-mul is timed under its
# shader's name and this role (kernel_times: "matvec_quant_idot gate+up"), so a profile splits the mat-vec time
ROLES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down", "lm_head": "head"}


def weight_role(name: str) -> str | None:
    """The role of a decoder weight named ``name``: ``"o"``, ``"down"``, ``"head"``...; a fused weight's (names
    joined by "+") joins its parts' roles (``"q+k+v"``, ``"gate+up"``). None for any other weight (the vision tower's,
    a benchmark's), timed under the shader's name alone."""
    roles = []
    for part in name.split("+"):
        words = part.split(".")
        role = next((r for key, r in ROLES.items() if key in words), None)
        if role is None or words[0] in ("visual", "merger"):
            return None
        roles.append(role)
    return "+".join(roles)


def int8_chunks(x: torch.Tensor) -> torch.Tensor:
    """x (float64) as ``matvec_quant_idot`` multiplies it: each whole 32-value chunk of a row as int8 codes times
    the chunk's scale max|x| / 127 (float32 steps as in the shader: 127 / max|x|, round half to even); a tail
    shorter than 32 stays exact. The reference the int-dot variant is checked against."""
    whole = x.shape[-1] // 32 * 32
    chunks = x[..., :whole].float().reshape(-1, 32)
    amax = chunks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    q = torch.round(chunks * inv).clamp(-127, 127)
    xq = (q.double() * (amax / 127.0).double()).reshape(*x.shape[:-1], whole)
    return torch.cat([xq, x[..., whole:].double()], -1)


class VkAct:
    """A float32 activation ``shape`` on the device; its buffer goes back to the pool when dropped. ``q8``: the
    same values as int8 per 32 (``shaders/x8.glsl``'s x8 rows), where the op that made it wrote them too. ``rms``
    (a norm folded into the mat-vec that made its input, ``producer_norm.FoldedNorm``): ``q8`` holds the norm's
    rows before their 1 / rms, which the int-dot mat-vecs reading them apply; the floats are made on first use."""

    __slots__ = ("backend", "_buf", "shape", "q8", "rms")

    def __init__(self, backend: "VulkanBackend", buf: Buffer | None, shape: tuple[int, ...], q8: Buffer | None = None,
                 rms=None):
        self.backend, self._buf, self.shape, self.q8, self.rms = backend, buf, tuple(int(s) for s in shape), q8, rms

    @property
    def buf(self) -> Buffer:
        if self._buf is None:  # a folded norm read as floats: the norm recorded now, before the op that reads it
            self._buf = self.rms.materialize(self)
        return self._buf

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def features(self) -> int:
        return self.shape[-1]

    def __del__(self):
        for buf in (self._buf, self.q8, self.rms and self.rms.parts):
            if buf is not None:
                self.backend._release(buf)

    def __repr__(self) -> str:
        return f"VkAct{list(self.shape)}"


@dataclass
class Piece:
    """Rows ``row0 .. row0+rows-1`` of a weight, in one buffer: codes (or floats), then scales, then zeros."""

    row0: int
    rows: int
    buf: Buffer
    w: tuple
    s: tuple | None
    z: tuple | None


@dataclass
class VkWeight:
    """An uploaded matrix ``[n_out, k]``: packed (bits 2/3/4/8) or float32 (bits 32), in row pieces."""

    name: str
    n_out: int
    k: int
    bits: int
    group: int
    scale_bf16: bool
    has_zeros: bool
    pieces: list[Piece]
    bias: Buffer | None = None

    @property
    def nbytes(self) -> int:  # its own ranges: pieces of a fused weight share one buffer (see VulkanBackend.linears)
        return sum(r[2] for p in self.pieces for r in (p.w, p.s, p.z) if r) + (self.bias.nbytes if self.bias else 0)


class VulkanBackend(AttentionOps, NormOps, ProducerNormOps, GreedyOps, Backend):
    name = "vulkan"

    def __init__(self, kernel_dir: str | Path | None = None, profile: bool = False):
        info = probe()
        if not info["present"]:
            raise LlmoptError(f"vulkan backend unavailable: {info['reason']}")
        if kernel_dir is None:
            tag = hashlib.sha256(repr(sorted(info["device"].items())).encode()).hexdigest()[:12]
            cache = Path(os.environ.get("LLMOPT_CACHE", Path.home() / ".cache" / "llmopt")) / "vulkan" / tag
            manifest = vk_compile.compile_shaders(vk_compile.REPO_SHADERS, cache, info)
            kernel_dir = cache
        else:
            manifest = vk_compile.check_manifest(Path(kernel_dir))
        spec = manifest["spec"]
        self.wg, self.rows_per_wg, self.tile = int(spec["wg"]), int(spec["rows"]), int(spec["tile"])
        self.wg_reduce = int(spec.get("wg_reduce", self.wg))
        self.matvec_min_groups = int(spec.get("matvec_min_groups", 1))
        self.matvec_split = int(spec.get("matvec_split", 0))
        self.matvec_wg_max = int(spec.get("matvec_wg_max", self.wg))
        self.matvec_int_dot = bool(spec.get("matvec_int_dot", 0))  # int2/4/8 mat-vecs through matvec_quant_idot
        self.matvec_x_q8 = bool(spec.get("matvec_x_q8", 0))  # norms feeding int-dot mat-vecs also write x as int8
        self.fuse_linears = True
        self.fuse_gated_act = bool(spec.get("matvec_gated", 0))  # gated_linears: the activation in the mat-vec
        # the gated mat-vec's (wg, invocations a set, rows a set): sets * rows / 2 outputs a workgroup (gated_linears)
        self.gated_layout = tuple(int(v) for v in spec.get("matvec_gated_layout", (64, 8, 8)))
        self.fuse_post_norm = True  # norm_add_rmsnorm: Gemma's post norm, the residual add and the next norm at once
        self.norm_regs_max = 16  # add_rmsnorm holds rows of up to this many values an invocation in registers
        # the replayed step's dispatches chained (chain.MODES); chained mat-vecs load chain_early weight chunks early
        self.decode_chain, self.chain_early = spec.get("decode_chain", "off"), int(spec.get("chain_early", 0))
        self._init_attention(info)
        self._fused: dict = {}  # ids of weights given to linears() -> (those weights, fused VkWeight or None)
        self.dev = Device(Path(kernel_dir), spec, profile=profile)
        self.probe = info
        self._init_producer_norm(spec)
        self._init_greedy()
        self._pool: dict[int, list[Buffer]] = {}
        self._owner: dict[int, dict] = {}  # id(buffer) -> the private pool of the recording that uses it
        self._uploads: dict = {}  # host tensor identity -> (device buffer, tensor) for this submission
        self.dummy = self.dev.buffer(16, name="dummy")
        self.weight_bytes = 0
        self.kinds: dict[str, int] = {}  # weight storage kind ("int4", "float32", ...) -> matrices uploaded

    # --- buffers ---------------------------------------------------------------------------------------
    def _alloc(self, nbytes: int, name: str = "activation") -> Buffer:
        nbytes = max(16, (int(nbytes) + 15) // 16 * 16)
        free = self._pool.get(nbytes) if self.dev.chain is None else None  # chained: each written once (chain.py)
        buf = free.pop() if free else self.dev.buffer(nbytes, name=name)
        if self.dev.capturing:  # a replayed step writes it again later: it never goes back to the shared pool
            self._owner[id(buf)] = self._pool
        return buf

    def _release(self, buf: Buffer) -> None:
        if getattr(self, "dev", None) is not None and self.dev.device is not None:
            self._owner.get(id(buf), self._pool).setdefault(buf.nbytes, []).append(buf)

    def private_pool(self, pool: dict | None) -> dict:
        """Make ``pool`` (``{}`` for a new one) the pool activations come from; returns the previous one.

        A recording (``llmopt.backends.vulkan.replay``) records its ops with a private pool, so the buffers its
        replays write never serve other activations; ``free_pool`` releases them when the recording goes."""
        previous, self._pool = self._pool, pool
        return previous

    def free_pool(self, pool: dict) -> None:
        for bufs in pool.values():
            for buf in bufs:
                self._owner.pop(id(buf), None)
                self.dev.free(buf)
        pool.clear()

    def _new(self, shape) -> VkAct:
        return VkAct(self, self._alloc(4 * math.prod(shape)), shape)

    def _upload_host(self, t: torch.Tensor, dtype) -> Buffer:
        """A device copy of a small host tensor, shared by every call in this submission that passes it."""
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t._version, str(dtype))
        hit = self._uploads.get(key)
        if hit is not None:
            return hit[0]
        arr = t.detach().cpu().contiguous().numpy().astype(dtype, copy=False)
        buf = self._alloc(arr.nbytes, "host table")
        self.dev.upload(buf, arr)
        self._uploads[key] = (buf, t)  # keep t alive so its address is not reused within the submission
        return buf

    def _submitted(self) -> None:
        for buf, _ in self._uploads.values():
            self._release(buf)
        self._uploads.clear()

    def _flush(self) -> None:
        self.dev.flush()
        self._submitted()

    def _grid(self, n_groups: int) -> tuple[int, int, int]:
        if n_groups <= MAX_GROUPS:
            return (n_groups, 1, 1)
        return (MAX_GROUPS, -(-n_groups // MAX_GROUPS), 1)

    def _run(self, shader: str, n_bindings: int, spec: tuple, bindings: list, push: bytes, groups,
             wg: int | None = None, label: str | None = None) -> None:
        wg = wg or (self.wg_reduce if shader in ROW_SHADERS else self.wg)
        pipe = self.dev.pipeline(shader, n_bindings, (wg, *spec))
        self.dev.dispatch(pipe, [(b, o, r) for b, o, r in bindings], push, groups, label)

    @staticmethod
    def _whole(buf: Buffer) -> tuple:
        return (buf, 0, None)

    # --- weights ---------------------------------------------------------------------------------------
    def param(self, name, tensor):
        arr = tensor.detach().to(torch.float32).contiguous().numpy()
        buf = self.dev.buffer(arr.nbytes, name=name)
        self.dev.upload(buf, arr)
        self.weight_bytes += buf.nbytes
        return buf

    def linear_weight(self, name, weight, bias=None):
        w = self._matrix(name, weight)
        if bias is not None:
            if bias.numel() != w.n_out:
                raise LlmoptError(f"{name}: bias has {bias.numel()} values for {w.n_out} output features")
            w.bias = self.param(name + ".bias", bias.reshape(-1))
        return w

    def embedding_table(self, name, weight):
        return self._matrix(name, weight)

    def _matrix(self, name: str, weight) -> VkWeight:
        if isinstance(weight, QuantizedTensor):
            n_out, k = weight.shape
            if weight.bits not in VULKAN_BITS:
                raise LlmoptError(f"{name}: int{weight.bits} weights have no Vulkan kernels yet (the shaders decode "
                                  f"int{'/'.join(map(str, VULKAN_BITS))}); quantize with a scheme of those widths, "
                                  "or run this model on the cpu or cuda backend")
            per_word = 32 // math.gcd(32, weight.bits)  # codes per word boundary period
            if weight.group % per_word and weight.group != k:
                raise LlmoptError(f"{name}: group {weight.group} is not a multiple of {per_word} codes "
                                  f"(the Vulkan kernels need whole words per group for int{weight.bits})")
            if weight.group % 32 and weight.group != k:
                raise LlmoptError(f"{name}: group {weight.group} must be a multiple of 32 (or the whole row) "
                                  "for the Vulkan kernels")
            codes = weight.qweight.contiguous().numpy().view(np.uint32).reshape(n_out, -1)
            scales = weight.scales.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(n_out, -1)
            zeros = None if weight.zeros is None else weight.zeros.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(n_out, -1)
            bits, group, bf16 = weight.bits, weight.group, weight.scales.dtype == torch.bfloat16
        elif isinstance(weight, torch.Tensor) and weight.dim() == 2:
            n_out, k = weight.shape
            codes = weight.detach().to(torch.float32).contiguous().numpy().view(np.uint32)
            scales = zeros = None
            bits, group, bf16 = 32, k, False
        else:
            raise LlmoptError(f"{name}: expected a QuantizedTensor or a 2-D float tensor, got {type(weight).__name__}")
        kind = "float32" if bits == 32 else f"int{bits}"
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        row_bytes = codes.shape[1] * 4
        rows_per_piece = max(1, min(n_out, self.dev.max_range // row_bytes))
        pieces = []
        for row0 in range(0, n_out, rows_per_piece):
            sl = slice(row0, min(n_out, row0 + rows_per_piece))
            parts = [codes[sl]] + [a[sl] for a in (scales, zeros) if a is not None]
            offsets, total = [], 0
            for a in parts:
                offsets.append(total)
                total += -(-a.nbytes // self.dev.align) * self.dev.align
            buf = self.dev.buffer(total, name=name)
            for a, off in zip(parts, offsets):
                self.dev.upload(buf, a, off)
            ranges = [(buf, off, max(4, -(-a.nbytes // 4) * 4)) for a, off in zip(parts, offsets)]
            pieces.append(Piece(row0, sl.stop - row0, buf, ranges[0],
                                ranges[1] if scales is not None else None, ranges[2] if zeros is not None else None))
            self.weight_bytes += buf.nbytes
        self._flush()
        return VkWeight(name, n_out, k, bits, group, bf16, zeros is not None, pieces)

    # --- activations -----------------------------------------------------------------------------------
    def from_host(self, x):
        arr = x.detach().to(torch.float32).contiguous().numpy()
        act = self._new(arr.shape)
        self.dev.upload(act.buf, arr)
        return act

    def to_host(self, x):
        out = self.dev.download(x.buf, 4 * math.prod(x.shape))
        self._submitted()
        return torch.from_numpy(out).view(x.shape)

    def synchronize(self):
        self._flush()

    # --- ops -------------------------------------------------------------------------------------------
    def embedding(self, ids, table: VkWeight, scale=1.0):
        return self._embed(*self._bound_ids(ids, table), table, scale)

    def _bound_ids(self, ids, table: VkWeight) -> tuple[tuple, tuple]:
        """Host token ``ids`` checked against ``table``'s rows and uploaded as uint32: (their binding, their shape),
        what ``_embed`` and ``_embed_norm`` take."""
        ids = torch.as_tensor(ids)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.n_out):
            raise LlmoptError(f"embedding {table.name}: token ids must lie in 0..{table.n_out - 1}, "
                              f"got {int(ids.min())}..{int(ids.max())}")
        return self._whole(self._upload_host(ids.to(torch.int64), np.uint32)), tuple(ids.shape)

    def _embed(self, ids: tuple, shape: tuple, table: VkWeight, scale: float) -> VkAct:
        """Rows of ``table`` for the uint32 ids bound at ``ids`` (buffer, offset, range), ``shape`` of them."""
        out = self._new((*shape, table.k))
        total = math.prod(shape) * table.k
        for pc in table.pieces:
            push = pack_push("IIIIIf", table.k, pc.rows, pc.row0, table.group, total, float(scale))
            self._run("embedding", 5, (table.bits, int(table.scale_bf16), int(table.has_zeros)),
                      [ids, pc.w, pc.s or self._whole(self.dummy), pc.z or self._whole(self.dummy),
                       self._whole(out.buf)], push, self._grid(-(-total // self.wg)))
        return out

    def linear(self, x: VkAct, w: VkWeight):
        if x.features != w.k:
            raise LlmoptError(f"linear {w.name}: input has {x.features} features, weight expects {w.k}")
        out = self._new((*x.shape[:-1], w.n_out))
        self._matmul(x, w, [out], x.rows, 1, 0)
        return out

    def linears(self, x: VkAct, ws) -> tuple:
        """``linear(x, w)`` for each of ``ws``, as one dispatch over their rows concatenated on the device where
        they can be (``llmopt.backends.vulkan.fusion``), else one dispatch each."""
        from llmopt.backends.vulkan.fusion import fused_weight  # imports this module

        fused = fused_weight(self, tuple(ws)) if self.fuse_linears and 2 <= len(ws) <= 3 else None
        if fused is None:
            return tuple(self.linear(x, w) for w in ws)
        if x.features != fused.k:
            raise LlmoptError(f"linears {fused.name}: input has {x.features} features, weights expect {fused.k}")
        outs = [self._new((*x.shape[:-1], w.n_out)) for w in ws]
        self._matmul(x, fused, outs, x.rows, 1, 0)
        return tuple(outs)

    def gated_linears(self, x: VkAct, gate: VkWeight, up: VkWeight, kind: str) -> VkAct:
        """``gated_act(x gate^T, x up^T, kind)``. At decode sizes, where ``fuse_gated_act`` is on and the two weights
        fuse (``linears``), one mat-vec over [gate; up] whose workgroups own matching gate and up rows and write
        act(gate) * up (no [2F] round trip, one dispatch fewer), laid out by ``gated_layout``: int4 weights, with whole
        32-value chunks a workgroup, also as x8 rows for the down projection (``_normed``'s conditions); otherwise
        ``linears`` then ``gated_act``."""
        from llmopt.backends.vulkan.fusion import fused_weight  # imports this module

        fused = None
        if self.fuse_gated_act and self.fuse_linears and x.rows <= MATVEC_MAX_M and gate.n_out == up.n_out:
            fused = fused_weight(self, (gate, up))
        if fused is None:
            return self.gated_act(*self.linears(x, (gate, up)), kind)
        if x.features != fused.k:
            raise LlmoptError(f"gated_linears {fused.name}: input has {x.features} features, weights expect {fused.k}")
        per = self._gated_sets()[1]  # outputs a workgroup
        out, _ = self._normed((*x.shape[:-1], gate.n_out), per if fused.bits == 4 and per % 32 == 0 else None)
        self._matmul(x, fused, [out], x.rows, 1, 0, gated=self._kind(kind) + 1)
        return out

    def _gated_sets(self) -> tuple[int, int]:
        """The gated mat-vec's row sets a workgroup and outputs a workgroup (``gated_layout``, checked)."""
        wg, split, rows = self.gated_layout
        most = int(self.probe["device"]["max_workgroup_invocations"])
        if rows < 2 or rows % 2 or wg & (wg - 1) or wg > most:
            raise LlmoptError(f"gated_layout {self.gated_layout}: expected (workgroup size, a power of two up to the "
                              f"device's {most}; invocations a set; an even number of rows a set)")
        per = (wg // split if split else 1) * rows // 2
        return self._matvec_sets(wg, rows, split, per + per // 32), per

    def _matmul(self, x: VkAct, w: VkWeight, outs: list, m: int, x_step: int, x_off: int, gated: int = 0,
                norm=None) -> None:
        """Record ``outs = x W^T (+ bias)`` for ``m`` input rows; several ``outs`` split W's rows in order.
        ``gated`` (mat-vec only; 1 + activation kind): W is [gate; up] and the one output act(gate) * up
        (``gated_layout``; also as x8 rows where ``gated_linears`` gave it a ``q8`` buffer). ``norm`` (int4 int-dot
        mat-vec, one output: ``producer_norm``): (residual, norm weight, offset, normed, post weight or None) makes
        the output residual + x W^T (post: outs x W^T and residual + rmsnorm(x W^T, post)) and writes the normed
        input's x8 rows and partial sums in ``norm_layout`` (post: ``sandwich_layout``). An x whose ``q8`` rows are
        a folded norm's (``rms``) has its sums scaled by 1 / rms."""
        bias = self._whole(w.bias) if w.bias is not None else self._whole(self.dummy)
        spec_tail = (w.bits, int(w.scale_bf16), int(w.has_zeros), int(w.bias is not None))
        bounds = np.cumsum([o.features for o in outs])[:-1].tolist()
        seg1, seg2 = (bounds + [w.n_out, w.n_out])[:2]
        ys = [self._whole(o.buf) for o in outs] + [self._whole(self.dummy)] * (3 - len(outs))
        int_dot = self.matvec_int_dot and w.bits in (2, 4, 8) and m <= MATVEC_MAX_M
        if int_dot and not self.dev.features["integer_dot_product"]:
            raise LlmoptError(f"Vulkan device '{self.dev.info['name']}' lacks shaderIntegerDotProduct "
                              "(VK_KHR_shader_integer_dot_product): the int-dot mat-vec cannot run there")
        x8 = x.q8 is not None and int_dot and w.bits == 4  # x's int8 copy, in the order of 4-bit codes
        x_rms = x.rms if x8 else None  # x8 rows of a folded norm, before its 1 / rms
        role = weight_role(w.name)
        if gated and (m > MATVEC_MAX_M or len(w.pieces) != 1 or w.n_out % 2):
            raise LlmoptError(f"gated mat-vec {w.name}: needs at most {MATVEC_MAX_M} input rows and one piece of "
                              f"[gate; up] rows, got {m} rows, {len(w.pieces)} pieces, {w.n_out} weight rows")
        for pc in w.pieces:
            bindings = [self._whole(x.q8 if x8 else x.buf), pc.w, pc.s or self._whole(self.dummy),
                        pc.z or self._whole(self.dummy), bias, *ys]
            rms_parts, eps = (x_rms.n_parts, x_rms.eps) if x_rms else (0, 0.0)
            # rms partials, residual, norm weight, post weight, arrival counters; NORM_OUT, TAIL_PER
            norm_bindings = [self._whole(x_rms.parts if x_rms else self.dummy)] + [self._whole(self.dummy)] * 4
            norm_out, tail_per = 0, 1
            if m <= MATVEC_MAX_M:
                q8, x8_out = (outs[0].q8 if gated else None), (0, 1)  # Q8, X8_LEN: the gated mat-vec's x8 rows
                if norm is not None:  # producer_norm: the layout, the x8 output, the epilogue's kind and buffers
                    (wg, split, rows), sets, q8, x8_out, rms_parts, eps, norm_out, tail_per, norm_bindings = \
                        self._norm_dispatch(norm, w.n_out)
                elif gated:
                    wg, split, rows = self.gated_layout
                    sets, per = self._gated_sets()
                    x8_out = (1, per + per // 32) if q8 is not None else x8_out
                    n = pc.rows // 2
                    push = pack_push("IIIIIIIII", w.k, n, n, 0, w.group, x_step, x_off, n, n)
                else:
                    wg, split, rows = self._matvec_wg(w.k), self.matvec_split, self.rows_per_wg
                    sets = self._matvec_sets(wg, rows, split)
                    while rows > 1 and -(-pc.rows // (rows * sets)) < self.matvec_min_groups:
                        rows //= 2
                if not gated:
                    push = pack_push("IIIIIIIII", w.k, pc.rows, w.n_out, pc.row0, w.group, x_step, x_off, seg1, seg2)
                gx, gy, _ = self._grid(-(-pc.rows // (rows * sets)))
                shader = "matvec_quant_idot" if int_dot else "matvec_quant"
                push += pack_push("Iff", rms_parts, eps, float(norm[2]) if norm is not None else 0.0)
                self._run(shader, 14, (rows, *spec_tail, split, int(x8), gated, *x8_out, norm_out,
                                       int(x_rms is not None), self.chain_early, tail_per),
                          bindings + [self._whole(q8 or self.dummy), *norm_bindings], push, (gx, gy, m), wg,
                          f"{shader} {role}" if role else None)
            else:
                push = pack_push("IIIIIIIIII", w.k, pc.rows, w.n_out, pc.row0, w.group, x_step, x_off, m, seg1, seg2)
                grid = (-(-pc.rows // self.tile), -(-m // self.tile), 1)
                self._run("matmul_quant", 8, (self.tile, *spec_tail), bindings, push, grid,
                          label=f"matmul_quant {role}" if role else None)

    def _matvec_wg(self, k: int) -> int:
        """Mat-vec workgroup size for rows of ``k``: doubled from ``wg`` up to ``matvec_wg_max`` while every invocation
        keeps two or more 32-value chunks (long rows want more loads in flight, short ones more workgroups)."""
        wg = self.wg
        while 2 * wg <= self.matvec_wg_max and k // 32 >= 2 * (2 * wg):
            wg *= 2
        return wg

    def _matvec_sets(self, wg: int, rows: int, split: int, staged: int = 0) -> int:
        """Row sets a mat-vec workgroup of ``wg`` holds, ``split`` invocations each (0: one set), after checking
        the specialization sizes (and ``staged`` floats of x8 staging) against the shader and device."""
        if split and (split & (split - 1) or wg % split):
            raise LlmoptError(f"matvec split {split}: expected 0 or a power of two dividing the workgroup size {wg}")
        shared = 4 * (rows * wg + staged)  # matvec_quant.glsl's `part` array, and the gated x8 rows' `x8_vals`
        if shared > self._shared_limit():
            raise LlmoptError(f"mat-vec rows {rows} x workgroup {wg} need {shared} bytes of shared memory; "
                              f"the device allows {self._shared_limit()}")
        return wg // split if split else 1

    def _shared_limit(self) -> int:
        """Bytes of shared memory a workgroup may use on this device (the probe always records it)."""
        return int(self.probe["device"]["max_shared_memory_bytes"])

    def _normed(self, shape: tuple, per_group: int | None) -> tuple[VkAct, tuple]:
        """The output of an op that can also write it as int8 (x8 rows, ``q8``: norms, gated_act, rope_attention),
        and the op's specialization (Q8, X8_LEN) for it. x8 rows are written where an int-dot mat-vec may read them:
        ``matvec_x_q8`` on, decode rows, a multiple of 32 features, and ``per_group`` (the values one workgroup
        quantizes: a row, or the workgroup's own; None: the op cannot) fitting the device's shared memory."""
        out = self._new(shape)
        f, rows = shape[-1], math.prod(shape[:-1])
        if (self.matvec_x_q8 and self.matvec_int_dot and per_group and rows <= MATVEC_MAX_M and f % 32 == 0
                and 4 * (per_group + per_group // 32 + self.wg_reduce) <= self._shared_limit()):
            out.q8 = self._alloc(rows * 160 * -(-f // 128), "x8")  # x8.glsl: 10 uvec4 per 4 chunks of 32
            return out, (1, per_group + per_group // 32)
        return out, (0, 1)

    def add(self, a, b):
        if a.shape != b.shape:
            raise LlmoptError(f"add: shapes {list(a.shape)} and {list(b.shape)} differ")
        out = self._new(a.shape)
        n = math.prod(a.shape)
        self._run("add", 3, (), [self._whole(a.buf), self._whole(b.buf), self._whole(out.buf)], pack_push("I", n),
                  self._grid(-(-n // self.wg)))
        return out

    def gated_act(self, gate, up, kind):
        if gate.shape != up.shape:
            raise LlmoptError(f"gated_act: gate {list(gate.shape)} and up {list(up.shape)} differ")
        whole = gate.features % self.wg == 0 and self.wg % 32 == 0  # x8: each workgroup inside one row
        out, x8 = self._normed(gate.shape, self.wg if whole else None)
        n = math.prod(gate.shape)
        self._run("gated_act", 4, x8, [self._whole(gate.buf), self._whole(up.buf),
                                                               self._whole(out.buf), self._whole(out.q8 or self.dummy)],
                  pack_push("III", n, self._kind(kind), gate.features), self._grid(-(-n // self.wg)))
        return out

    def act(self, x, kind):
        out = self._new(x.shape)
        n = math.prod(x.shape)
        self._run("act", 2, (), [self._whole(x.buf), self._whole(out.buf)], pack_push("II", n, self._kind(kind)),
                  self._grid(-(-n // self.wg)))
        return out

    @staticmethod
    def _kind(kind: str) -> int:
        if kind not in ACT_KINDS:
            raise LlmoptError(f"vulkan backend: activation {kind!r} is not supported (expected one of {', '.join(ACT_KINDS)})")
        return ACT_KINDS[kind]

    def logits_device(self, x: VkAct, head: VkWeight, softcap: float | None = None) -> VkAct:
        """The last token's logits ``[B, vocab]`` left on the device (final softcap applied)."""
        B, T = x.shape[0], x.rows // x.shape[0]
        if x.features != head.k:
            raise LlmoptError(f"logits: input has {x.features} features, head {head.name} expects {head.k}")
        out = self._new((B, head.n_out))
        self._matmul(x, head, [out], B, T, T - 1)
        if softcap:
            self._softcap(out, softcap)
        return out

    def logits(self, x, head, softcap=None):
        return self.to_host(self.logits_device(x, head, softcap))

    def replay_decoder(self, model, state):
        """The model's decode step recorded once on this device and replayed per token (``replay.VulkanDecoder``)."""
        from llmopt.backends.vulkan.replay import VulkanDecoder

        return VulkanDecoder(model, state)

    def copy(self, src: Buffer, dst: Buffer, nbytes: int) -> None:
        """Record a shader copy of ``nbytes`` (a multiple of 16) from ``src`` to ``dst``."""
        n4 = nbytes // 16
        groups = min(-(-n4 // self.wg), 8 * MAX_GROUPS)
        self._run("copy", 2, (), [(src, 0, nbytes), (dst, 0, nbytes)], pack_push("II", n4, groups * self.wg),
                  self._grid(groups))

    def kernel_times(self) -> dict[str, tuple[float, int]]:
        """Per-kernel GPU time (ms) and dispatch count since construction (``profile=True`` only); mat-vecs and
        mat-muls of decoder weights per kernel and weight role (``weight_role``)."""
        return {k: (v, self.dev.kernel_counts[k]) for k, v in sorted(self.dev.kernel_times.items(), key=lambda kv: -kv[1])}

    def close(self) -> None:
        """Free every device object; the backend is unusable afterwards."""
        if self.dev.device is not None:
            self._flush()
            for bufs in self._pool.values():
                for buf in bufs:
                    self.dev.free(buf)
            self._pool.clear()
            self.dev.close()
