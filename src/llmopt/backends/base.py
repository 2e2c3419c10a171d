"""The backend interface: the handful of ops a decoder (and the Qwen2.5-VL vision tower) needs.

The model code (``llmopt.engine``) calls only these methods, so one model runs on any device; a backend is one
module implementing them for one device (cpu, cuda, vulkan, iree-cpu, npu). Contract:

- Activations are backend-owned objects (``Act``) standing for float tensors shaped ``[B, T, F]`` (batch,
  tokens, features); heads are packed into F (``F = n_heads * head_dim``). ``from_host``/``to_host`` convert
  to and from CPU ``torch.Tensor`` (float32 on the host side). Between two backends of a partition the engine
  moves activations with ``to_host`` then ``from_host``.
- Weights are uploaded once: ``linear_weight`` takes a ``QuantizedTensor`` (llmopt packed format,
  ``llmopt.quant.format``) or a float ``torch.Tensor`` ``[out, in]`` plus an optional bias; ``param`` takes any
  float vector or table (norm weights, ...); ``embedding_table`` takes a table ``[vocab, hidden]``, packed or float.
- Ops compute in float32 (or better), matching the float64/float32 torch reference in ``llmopt.backends.cpu``
  within the tolerance each backend's tests state.
- ``rope`` rotates with the rotate-half convention using host tables ``cos``/``sin`` ``[B, T, head_dim]`` that
  the model computes (this covers default, linearly scaled and multimodal M-RoPE positions alike).
- ``attention`` is causal over the KV cache. ``cache`` comes from ``kv_cache``; the call first writes this
  step's ``k``/``v`` into cache slots ``start .. start+T-1`` (the same slots for every sequence of the batch),
  then attends. ``valid`` (host bool ``[B, start+T]`` or None) marks the slots holding real tokens, so left
  padding is excluded. Sliding-window layers (``spec.window``) see only the last ``window`` slots, and the
  cache may keep only those. ``spec.softcap`` applies ``softcap * tanh(scores / softcap)`` before the softmax.
- ``attention_full`` is non-causal attention within segments (vision tower): ``segments`` lists the
  ``(start, end)`` token ranges, each attending only to itself; no cache.
- ``logits`` returns host float32 ``[B, vocab]`` for the last token of each sequence, final softcap applied.

Optional methods a backend may add; the engine looks them up with ``getattr`` and falls back to the plain ops:
``linears(x, weights)`` (several projections of one input, e.g. q/k/v or gate/up, as one fused matmul; CUDA and
Vulkan), ``add_rmsnorm(a, b, weight, eps, unit_offset)`` returning ``(a + b, rmsnorm(a + b))`` in one pass
(Vulkan), ``norm_add_rmsnorm(a, b, post_weight, weight, eps, unit_offset)`` the same with ``b`` first normed by
``post_weight`` (Gemma's sandwich norms; Vulkan), ``rope_attention(q, k, v, cos, sin, head_dim, cache, layer, start, valid, spec)`` (RoPE on q and k, the
KV store and ``attention`` in one op; Vulkan, decode steps), ``gated_linears(x, gate, up, kind)`` returning
``gated_act(x gate^T, x up^T, kind)`` from one fused matmul (Vulkan), and ``replay_decoder(model, state)``
returning an object whose ``step(state, ids, greedy)`` runs a recorded decode step (Vulkan; CUDA's equivalent
is ``llmopt.engine.cudagraph.StaticDecoder``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

Act = Any  # a backend's activation handle, [B, T, F]
Weight = Any  # a backend's uploaded weight handle


@dataclass(frozen=True)
class AttnSpec:
    """Shape and variant of one attention layer."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float  # multiplies q.k (1/sqrt(head_dim), or query_pre_attn_scalar**-0.5 for Gemma)
    window: int | None = None  # sliding window in tokens; None = global
    softcap: float | None = None  # attention logit softcap (Gemma 2)


class KVCache(ABC):
    """A preallocated per-layer key/value store owned by one backend."""

    batch: int
    max_len: int


class Backend(ABC):
    """One device's implementation of the ops; see the module docstring for the contract."""

    name: str = "abstract"

    # --- weights, uploaded once -------------------------------------------------------------------
    @abstractmethod
    def param(self, name: str, tensor: torch.Tensor) -> Weight: ...

    @abstractmethod
    def linear_weight(self, name: str, weight: Any, bias: torch.Tensor | None = None) -> Weight: ...

    @abstractmethod
    def embedding_table(self, name: str, weight: Any) -> Weight: ...

    # --- activations -------------------------------------------------------------------------------
    @abstractmethod
    def from_host(self, x: torch.Tensor) -> Act: ...

    @abstractmethod
    def to_host(self, x: Act) -> torch.Tensor: ...

    @abstractmethod
    def kv_cache(self, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 windows: list[int | None]) -> KVCache: ...

    # --- ops ---------------------------------------------------------------------------------------
    @abstractmethod
    def embedding(self, ids: torch.Tensor, table: Weight, scale: float = 1.0) -> Act:
        """Rows of ``table`` for host int64 ``ids [B, T]``, times ``scale``."""

    @abstractmethod
    def linear(self, x: Act, w: Weight) -> Act:
        """``x @ W.T + bias``."""

    @abstractmethod
    def rmsnorm(self, x: Act, weight: Weight, eps: float, unit_offset: bool, group: int | None = None) -> Act:
        """RMS-normalise over the last dim (or each chunk of ``group`` features: per-head QK-norm), then scale
        by ``weight`` (``1 + weight`` when ``unit_offset``, as Gemma stores it)."""

    @abstractmethod
    def layernorm(self, x: Act, weight: Weight, bias: Weight, eps: float) -> Act: ...

    @abstractmethod
    def add(self, a: Act, b: Act) -> Act: ...

    @abstractmethod
    def rope(self, x: Act, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> Act:
        """Rotate each head of ``x`` (rotate-half convention) with host tables ``[B, T, head_dim]``."""

    @abstractmethod
    def attention(self, q: Act, k: Act, v: Act, cache: KVCache, layer: int, start: int,
                  valid: torch.Tensor | None, spec: AttnSpec) -> Act: ...

    @abstractmethod
    def attention_full(self, q: Act, k: Act, v: Act, segments: list[tuple[int, int]], spec: AttnSpec) -> Act: ...

    @abstractmethod
    def gated_act(self, gate: Act, up: Act, kind: str) -> Act:
        """``act(gate) * up`` with kind ``"gelu_tanh"`` (GeGLU, Gemma) or ``"silu"`` (SwiGLU, Qwen)."""

    @abstractmethod
    def act(self, x: Act, kind: str) -> Act:
        """Plain activation: ``"gelu"`` (erf), ``"gelu_tanh"``, ``"silu"`` or ``"quick_gelu"``."""

    @abstractmethod
    def logits(self, x: Act, head: Weight, softcap: float | None = None) -> torch.Tensor:
        """Host float32 ``[B, vocab]`` for the last token of each sequence."""

    def synchronize(self) -> None:
        """Wait for queued work (timing boundaries); a no-op for synchronous backends."""
