"""Static-shape decode step, captured once as a CUDA graph and replayed per token (batch-1 decode without Python).

A normal ``Model.decode_step`` slices the KV cache by a host integer, builds RoPE tables on the host and copies the
logits back: ~20 launches per layer issued one by one from Python, so a 7B int4 decode is launch-bound. Here every
per-step input lives in a device tensor updated in place (token ids, RoPE position, cache slot), the step writes
K/V with ``index_copy_`` at the slot tensor and attends over the whole preallocated cache under a slot mask, and
the counters advance inside the step. The shapes never change, so one ``torch.cuda.CUDAGraph`` capture replays the
whole step with one launch. On a CPU backend the same static step runs eagerly (that is how it is tested here).

    dec = StaticDecoder(model, state)            # after model.prefill(..., max_len=...)
    logits = dec.step(next_ids)                  # device float32 [B, vocab]; state advances like decode_step

Limits (checked, ``LlmoptError`` otherwise): one torch-tensor backend (cpu/cuda) for the embedding, every layer
and the head; no left padding in the batch.
"""

from __future__ import annotations

import torch

from llmopt.backends.cpu import CpuBackend, TorchKVCache
from llmopt.engine.rope import inv_freq
from llmopt.errors import LlmoptError


class _StaticOps:
    """The backend's ops, with attention replaced by the fixed-shape cache write + masked attention."""

    def __init__(self, backend: CpuBackend, decoder: StaticDecoder):
        self._be, self._dec = backend, decoder

    def __getattr__(self, name):
        return getattr(self._be, name)

    def attention(self, q, k, v, cache: TorchKVCache, layer, start, valid, spec):
        B = q.shape[0]
        hd = spec.head_dim
        q = q.view(B, 1, spec.n_heads, hd).transpose(1, 2)
        k = k.view(B, 1, spec.n_kv_heads, hd).transpose(1, 2)
        v = v.view(B, 1, spec.n_kv_heads, hd).transpose(1, 2)
        ring, ck, cv = cache.slot_pos[layer], cache.k[layer], cache.v[layer]
        if ring is None:  # global layer: slot = position; attend over slots <= this one
            ck.index_copy_(2, self._dec.slot, k)
            cv.index_copy_(2, self._dec.slot, v)
            mask = self._dec.global_mask
        else:  # sliding layer: ring slot; after the write the ring holds exactly the window ending here
            ring_slot = self._dec.slot % cache.windows[layer]
            ck.index_copy_(2, ring_slot, k)
            cv.index_copy_(2, ring_slot, v)
            ring.index_copy_(0, ring_slot, self._dec.slot)
            mask = (ring >= 0)[None, None, None, :]
        out = self._be._attend(q, ck, cv, mask, spec)
        return out.transpose(1, 2).reshape(B, 1, spec.n_heads * hd)


class StaticDecoder:
    """One fixed-shape decode step over ``state``'s caches; a CUDA graph of it on CUDA (``graph=None``: auto)."""

    def __init__(self, model, state, graph: bool | None = None):
        devs = {model.embed_dev, model.head_dev, *model.layer_dev}
        if len(devs) != 1:
            raise LlmoptError(f"static decode: needs one backend for the whole model, the plan uses {sorted(devs)}")
        be = model.backends[devs.pop()]
        if not isinstance(be, CpuBackend):
            raise LlmoptError(f"static decode: backend {be.name!r} is not a torch-tensor backend (cpu or cuda)")
        if state.padded:
            raise LlmoptError("static decode: the batch is left-padded (padding masks are not static); "
                              "use Model.decode_step")
        self.model, self.state, self.be = model, state, be
        dev = be.device
        self.graph_wanted = dev.type == "cuda" if graph is None else graph
        if self.graph_wanted and dev.type != "cuda":
            raise LlmoptError(f"static decode: CUDA graphs need a CUDA device, the backend is on {dev}")
        B = state.valid.shape[0]
        self.ids = torch.zeros(B, 1, dtype=torch.int64, device=dev)
        self.pos = state.next_pos.view(B, 1).to(dev).clone()  # RoPE position of the token being decoded
        self.slot = torch.full((1,), state.start, dtype=torch.int64, device=dev)  # its cache slot
        self.all_slots = torch.arange(state.max_len, device=dev)
        self.global_mask = None
        self.freqs = {r: inv_freq(r, model.args.head_dim).to(dev) for r in set(model.args.rope_layers)}
        self.ops = _StaticOps(be, self)
        self.graph, self.out = None, None

    def _rope(self, rope):
        # M-RoPE with text positions (all three axes equal) reduces to plain RoPE: every section rotates by pos.
        angles = self.pos[..., None].float() * self.freqs[rope]
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos(), emb.sin()

    def _step(self) -> torch.Tensor:
        """The whole step on device tensors only (what the graph captures); advances slot and position."""
        m, a, ops = self.model, self.model.args, self.ops
        self.global_mask = (self.all_slots <= self.slot)[None, None, None, :]
        x, normed = m._embed(ops, self.ids, True)
        tables = {r: self._rope(r) for r in self.freqs}
        x = m._stack(x, ops, tables, self.state, None, ops, normed)
        y = ops.linear(x, m.head)[:, 0].float()
        if a.final_softcap:
            y = a.final_softcap * torch.tanh(y / a.final_softcap)
        self.slot.add_(1)
        self.pos.add_(1)
        return y

    def capture(self):
        """Warm up (kernel selection, allocator) off the main stream, restore the counters, capture one step.

        ``step`` does this on first use; call it earlier to keep the capture out of a timed loop."""
        slot, pos = self.slot.clone(), self.pos.clone()
        side = torch.cuda.Stream(self.be.device)
        side.wait_stream(torch.cuda.current_stream(self.be.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # writes this step's own cache slot, which the real step overwrites
                self._step()
                self.slot.copy_(slot)
                self.pos.copy_(pos)
        torch.cuda.current_stream(self.be.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._step()
        self.slot.copy_(slot)
        self.pos.copy_(pos)

    def step(self, ids) -> torch.Tensor:
        """Decode one token per sequence (``ids [B]``, host or device); device float32 logits ``[B, vocab]``.

        The returned tensor is overwritten by the next step under a graph: copy it to keep it."""
        st = self.state
        if st.start >= st.max_len:
            raise LlmoptError(f"{st.start + 1} tokens exceed the KV cache of {st.max_len} tokens")
        self.ids.copy_(torch.as_tensor(ids).view(-1, 1), non_blocking=True)
        st.valid[:, st.start] = True
        if not self.graph_wanted:
            out = self._step()
        else:
            if self.graph is None:
                self.capture()
            self.graph.replay()
            out = self.out
        st.start += 1
        st.next_pos = st.next_pos + 1
        return out
