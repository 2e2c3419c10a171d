"""Replayed Vulkan decode: one decode step recorded once into command buffers and resubmitted for every token.

A normal ``Model.decode_step`` on ``VulkanBackend`` records ~16 dispatches a layer from Python for every token
(pipeline and descriptor lookups, push constants, barriers, one cffi call each), which on a GPU costs more than the
GPU's work (docs/benchmarks.md). Here the step is recorded once, with every per-token input read by the shaders
from a small step buffer instead of push constants or uploads:

    step buffer:  [ids of the B sequences]  [slot]                   [RoPE position of   [cos rows] [sin rows]
                                                                       each sequence]      [B, head_dim] a RoPE kind
                  embedding                 kv_store, attention,     rope (row of a      rope_attention (q and
                                            rope_attention           table of every      this step's k)
                                                                     position)

Before each submit the host writes those words (and rows of its copy of the RoPE tables: the fused attention ropes
q after one round trip, not after fetching the slot or a position first) into a host-visible copy; a recorded
prologue copies them to the device buffer ahead of the body. The RoPE tables (cos/sin of every position the state
can reach, per RoPE kind; for the unfused rope) and the padding mask (the prompt's valid flags; decode slots are
always valid) are uploaded once. In the body
every residual add is fused with the norm after it (``add_rmsnorm``: the next layer's attention norm, or the final
norm; with Gemma's sandwich norms the post norm before it too, ``norm_add_rmsnorm``), as in an eager
``Model._forward``, so the two run the same kernels. The body ends at the logits; one of two recorded tails
follows in the same submission: the greedy tail (``argmax.comp``, 4 bytes a sequence back; Gemma's final softcap
folded into it, ``greedy.py``) or the logits tail (the softcap, then the whole ``[B, vocab]`` back, for sampling).

    dec = VulkanDecoder(model, state)              # after model.prefill(..., max_len=...); records the step
    ids = dec.step(state, next_ids, greedy=True)   # int64 [B]; state advances like Model.decode_step
    logits = dec.step(state, next_ids)             # host float32 [B, vocab]
    ids = dec.greedy_steps(state, next_ids, n, stop=lambda ids: bool((ids == eos).all()))  # int64 [B, <= n]

``VulkanDecoder(model, state, profile=True)`` records a timestamp after every dispatch and copy, inside the recorded
command buffers (their query pools reset there too), so ``step`` and ``replay`` time the replayed step at the
clocks of real use; ``kernel_times()`` sums them by kernel name over every profiled submission (mat-vecs by kernel
and weight role, "matvec_quant_idot gate+up": ``backend.weight_role``). A profiled decoder refuses ``greedy_steps``
(two submissions of one recording in flight would share its query pool).

``greedy_steps`` keeps two steps in flight: step t+1 is queued before the host waits for step t, so the GPU never
idles while the host reads ids and writes the next step. The greedy tail's argmax writes its ids into the step
buffer's ids (copied from there to the host), and step t+1's prologue copies only the slot and positions (the host
knows them: each advances by one), so step t+1 embeds step t's ids straight from the device. Host step buffers and
id readbacks come in pairs, used alternately, each rewritten only after the step that read it was waited for. A
step queued past a stop is waited for and dropped: the state does not advance for it, and the cache slot it wrote is
the next step's slot, rewritten by that step before its attention reads it.

Where ``VulkanBackend.decode_chain`` says so (``chain.chain_mode``: "auto" on GPUs chains every model but those with
sandwich norms not folded into their producers), the body's dispatches are chained (``llmopt.backends.vulkan.chain``):
no barriers between them, a counter zeroed by the prologues, its two words copied back by every tail and checked
after each step (a timeout raises).

``Model.decode_step`` (and ``decode_greedy``; ``decode_greedy_steps``, which ``generate`` uses for greedy decoding,
through ``greedy_steps``) use it by themselves when the embedding, every layer and the head are on one
``VulkanBackend``; ``Model.static_decode = False`` turns it off. Buffers the replay writes come
from a private activation pool (``VulkanBackend.private_pool``), so no other activation ever shares them.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np
import torch

from llmopt.backends.vulkan.backend import VulkanBackend
from llmopt.backends.vulkan.chain import Chain, chain_mode
from llmopt.engine.rope import rope_tables
from llmopt.errors import LlmoptError


class _ReplayOps:
    """The backend's ops while recording: the embeddings, rope and attention read the step buffer; the rest as is."""

    def __init__(self, be: VulkanBackend, dec: "VulkanDecoder"):
        self._be, self._dec = be, dec

    def __getattr__(self, name):
        return getattr(self._be, name)

    def embedding(self, ids, table, scale=1.0):
        return self._be._embed(self._dec.region("ids"), (self._dec.batch, 1), table, scale)

    def embedding_rmsnorm(self, ids, table, scale, norm_weight, eps, unit_offset):
        return self._be._embed_norm(self._dec.region("ids"), (self._dec.batch, 1), table, scale, norm_weight, eps,
                                    unit_offset)

    def rope(self, x, cos, sin, head_dim):  # cos, sin: the decoder's device tables of every position
        return self._be._rope(x, cos, sin, head_dim, pos=self._dec.region("pos"))

    def attention(self, q, k, v, cache, layer, start, valid, spec):
        dec = self._dec
        return self._be._cached_attention(q, k, v, cache, layer, 0, dec.mask, cache.max_len, spec,
                                          slot=dec.region("slot"))

    def rope_attention(self, q, k, v, cos, sin, head_dim, cache, layer, start, valid, spec):
        be, dec = self._be, self._dec
        if not be._fusable(q, spec, cache):
            return self.attention(self.rope(q, cos, sin, head_dim), self.rope(k, cos, sin, head_dim), v, cache, layer,
                                  start, valid, spec)
        # the slot word, and this step's cos/sin rows of the layer's RoPE kind: q's rotation needs no position first
        return be._rope_attend(q, k, v, *dec.step_rows[id(cos)], cache, layer, 0, dec.mask, cache.max_len, spec,
                               step=dec.region("slot"))


class VulkanDecoder:
    """The decode step of ``model`` over ``state``'s KV cache, recorded once; see the module docstring."""

    def __init__(self, model, state, profile: bool = False):
        devs = {model.embed_dev, model.head_dev, *model.layer_dev}
        if len(devs) != 1:
            raise LlmoptError(f"replayed decode needs one backend for the embedding, layers and head; the plan uses "
                              f"{sorted(devs)}")
        be = model.backends[devs.pop()]
        if not isinstance(be, VulkanBackend):
            raise LlmoptError(f"replayed decode: backend {be.name!r} is not a VulkanBackend")
        if state.start >= state.max_len:
            raise LlmoptError(f"{state.start + 1} tokens exceed the KV cache of {state.max_len} tokens")
        a = model.args
        self.be, self.dev, self.profile = be, be.dev, profile
        self._stepped = False  # replay resubmits step buffer 0 as the last step() wrote it
        self.caches = state.caches  # the recording binds them: they live as long as it does
        self.batch, self.vocab, self.max_len = int(state.valid.shape[0]), a.vocab_size, state.max_len
        B, dev = self.batch, be.dev
        # step buffer regions, each at the device's storage-buffer offset alignment; after the positions, this
        # step's cos and sin rows [B, head_dim] of each RoPE kind (rope_attention reads q's rotation from there)
        ropes = sorted(set(a.rope_layers), key=repr)
        words = {"ids": B, "slot": 1, "pos": B}  # slot, pos and rows adjacent: one copy advances all
        words.update({f"{t}{i}": B * a.head_dim for i in range(len(ropes)) for t in ("cos", "sin")})
        self.offsets, size = {}, 0
        for name, n in words.items():
            self.offsets[name] = size
            size += -(-4 * n // dev.align) * dev.align
        self.sizes = {name: 4 * n for name, n in words.items()}
        self._resources = []
        self._pool: dict = {}
        self.chain = None
        self.body, self.logits_tail, self.loads, self.advances, self.greedy_tails = None, None, [], [], []
        try:
            self.step_host = [self._buffer(size, host=True, name="decode step (host)") for _ in range(2)]
            self.step_dev = self._buffer(size, name="decode step")
            self.step_words = [buf.view(np.uint32, size // 4) for buf in self.step_host]
            self.step_floats = [buf.view(np.float32, size // 4) for buf in self.step_host]
            self.ids_out = [self._buffer(4 * B, host=True, cached=True, name="greedy ids") for _ in range(2)]  # read by
            self.logits_out = self._buffer(4 * B * self.vocab, host=True, cached=True, name="logits readback")  # cached
            mode = chain_mode(be.decode_chain, a, be.fuse_sandwich_norm)
            if mode != "off":  # the body's dispatches chained: counter and error word read back per tail
                self.chain = Chain(dev, mode)
                self.chain_out = [self._buffer(16, host=True, name="chain readback") for _ in range(2)]
            self.table_len = int(state.next_pos.max()) + state.max_len - state.start
            self.host_rows, self.tables, self.step_rows = {}, {}, {}
            for i, r in enumerate(ropes):
                cos, sin = rope_tables(r, torch.arange(self.table_len).view(1, -1), a.head_dim)  # the host's tables
                self.host_rows[f"cos{i}"], self.host_rows[f"sin{i}"] = cos[0].numpy(), sin[0].numpy()
                self.tables[r] = tuple(self._upload(t.contiguous().numpy()) for t in (cos, sin))
                self.step_rows[id(self.tables[r][0])] = (self.region(f"cos{i}"), self.region(f"sin{i}"))
            self.mask = None
            if state.padded:  # prompt slots as valid as they were; every slot a decode step writes is valid
                valid = state.valid.clone()
                valid[:, state.start:] = True
                self.mask = self._buffer(4 * B * state.max_len, name="decode mask")
                dev.upload(self.mask, valid.to(torch.int32).numpy().astype(np.uint32))
            dev.flush()
            self._record(model, state)
        except BaseException:
            self.close()
            raise

    def _buffer(self, nbytes: int, host: bool = False, cached: bool = False, name: str = "replay"):
        buf = self.dev.buffer(nbytes, host=host, cached=cached, name=name)
        self._resources.append(buf)
        return buf

    def _upload(self, table: np.ndarray):
        buf = self._buffer(table.nbytes, name="rope table")
        self.dev.upload(buf, table)
        return buf

    def region(self, name: str) -> tuple:
        return (self.step_dev, self.offsets[name], self.sizes[name])

    def _record(self, model, state) -> None:
        m, a, be, dev = model, model.args, self.be, self.dev
        ops = _ReplayOps(be, self)
        shared = be.private_pool(self._pool)
        try:
            for host in self.step_host:  # prologues: every word from the host, or all but the ids
                dev.begin_recording(self.profile)
                dev.copy(host, self.step_dev, host.nbytes)
                self._reset_chain()
                self.loads.append(dev.end_recording())
                dev.begin_recording(self.profile)
                start = self.offsets["slot"]
                dev.copy(host, self.step_dev, host.nbytes - start, src_offset=start, dst_offset=start)
                self._reset_chain()
                self.advances.append(dev.end_recording())
            dev.begin_recording(self.profile)
            dev.chain = self.chain
            x, first = m._embed(ops, None, True)
            normed = m._stack(x, ops, self.tables, state, None, ops, first)
            del x, first
            # the final softcap in the tails: folded into the greedy tail's argmax, its own dispatch in the logits tail
            self.logits = be.logits_device(normed, m.head)
            del normed
            dev.chain = None
            self.body = dev.end_recording()
            for parity, ids_out in enumerate(self.ids_out):  # argmax into the next embedding's ids, then to the host
                dev.begin_recording(self.profile)
                be._argmax(self.logits, self.region("ids"), a.final_softcap)
                dev.copy(self.step_dev, ids_out, 4 * self.batch, src_offset=self.offsets["ids"])
                if self.chain is not None:
                    self.chain.record_readback(self.chain_out[parity])
                self.greedy_tails.append(dev.end_recording())
            dev.begin_recording(self.profile)
            if a.final_softcap:
                be._softcap(self.logits, a.final_softcap)
            dev.copy(self.logits.buf, self.logits_out, 4 * self.batch * self.vocab)
            if self.chain is not None:
                self.chain.record_readback(self.chain_out[0])
            self.logits_tail = dev.end_recording()
        except BaseException:
            dev.abort_recording()
            raise
        finally:
            dev.chain = None
            be.private_pool(shared)

    def _reset_chain(self) -> None:
        if self.chain is not None:
            self.chain.record_reset()

    def _check_chain(self, parity: int) -> None:
        """Raise if the chained step whose tail read back into ``chain_out[parity]`` timed out or miscounted."""
        if self.chain is not None:
            try:
                self.chain.check(self.chain_out[parity])
            except LlmoptError:
                self.be.reset_arrivals()  # workgroups that skipped their work never counted in (or tagged a slot)
                raise

    def _check_ids(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if ids.numel() != self.batch:
            raise LlmoptError(f"decode step: {ids.numel()} token ids for a batch of {self.batch}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab:
            raise LlmoptError(f"decode step: token ids must lie in 0..{self.vocab - 1}, got {int(ids.min())}..{int(ids.max())}")
        return ids

    def _write(self, state, parity: int, ahead: int = 0, ids: torch.Tensor | None = None) -> None:
        """Host words of the step ``ahead`` steps after ``state`` into step buffer ``parity`` (ids: None = from the
        device, the step before's argmax)."""
        if state.start + ahead >= state.max_len:
            raise LlmoptError(f"{state.start + ahead + 1} tokens exceed the KV cache of {state.max_len} tokens")
        w, o, B = self.step_words[parity], self.offsets, self.batch
        w[o["slot"] // 4] = state.start + ahead
        pos = (state.next_pos + ahead).numpy()
        w[o["pos"] // 4:o["pos"] // 4 + B] = pos
        f = self.step_floats[parity]
        for name, table in self.host_rows.items():
            f[o[name] // 4:o[name] // 4 + table.shape[1] * B] = table[pos].reshape(-1)
        if ids is not None:
            w[o["ids"] // 4:o["ids"] // 4 + B] = ids.numpy()

    @staticmethod
    def _advance(state) -> None:
        state.valid[:, state.start] = True
        state.start += 1
        state.next_pos = state.next_pos + 1

    def _ids(self, parity: int) -> torch.Tensor:
        return torch.from_numpy(self.ids_out[parity].view(np.uint32, self.batch).astype(np.int64))

    def step(self, state, ids, greedy: bool = False) -> torch.Tensor:
        """Decode one token per sequence (``ids [B]``): greedy next ids ``[B]`` (int64), or host logits ``[B, vocab]``."""
        self._write(state, 0, ids=self._check_ids(ids))
        self._stepped = True
        self._submit((self.loads[0], self.body, self.greedy_tails[0] if greedy else self.logits_tail))
        self._check_chain(0)
        self._advance(state)
        if greedy:
            return self._ids(0)
        return torch.from_numpy(self.logits_out.view(np.float32, self.batch * self.vocab).copy()).view(self.batch, self.vocab)

    def greedy_steps(self, state, ids, n: int, stop: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
        """Up to ``n`` greedy steps from ``ids [B]``, two in flight: the ids of each, int64 ``[B, k]``, k <= n.

        ``stop(ids [B])`` is called on each step's ids in order; True ends the run after that step. The state
        advances for the k steps returned only, exactly as k ``step(..., greedy=True)`` calls would leave it."""
        ids = self._check_ids(ids)
        if self.profile:
            raise LlmoptError("greedy_steps: a profiled decoder times one submission at a time (step or replay)")
        if n <= 0:
            return torch.zeros(self.batch, 0, dtype=torch.int64)
        if state.start + n > state.max_len:
            raise LlmoptError(f"{state.start + n} tokens exceed the KV cache of {state.max_len} tokens")
        dev, body, out = self.dev, self.body, []
        self._write(state, 0, ids=ids)
        queued = deque([dev.submit((self.loads[0], body, self.greedy_tails[0]), wait=False)])
        try:
            for k in range(n):
                if k + 1 < n:  # queue step k+1 before waiting for step k; it embeds step k's ids on the device
                    parity = (k + 1) % 2
                    self._write(state, parity, ahead=1)
                    queued.append(dev.submit((self.advances[parity], body, self.greedy_tails[parity]), wait=False))
                dev.wait(queued.popleft())
                self._check_chain(k % 2)
                out.append(self._ids(k % 2))
                self._advance(state)
                if stop is not None and stop(out[-1]):
                    break
        finally:
            while queued:  # a step queued past the stop (or an error): run, dropped
                dev.wait(queued.popleft())
        return torch.stack(out, dim=1)

    def replay(self, times: int, greedy: bool = True) -> None:
        """Resubmit the last step ``times`` times back to back (timing: the GPU-bound rate of the replayed step);
        profiled, one at a time, each waited for and its timestamps collected."""
        if not self._stepped:
            raise LlmoptError("replay: no step has run on this decoder yet (its step buffer holds no slot or ids)")
        recordings = (self.loads[0], self.body, self.greedy_tails[0] if greedy else self.logits_tail)
        if self.profile:
            for _ in range(times):
                self._submit(recordings)
        else:
            self.dev.submit(recordings, times)
        self._check_chain(0)

    def _submit(self, recordings: tuple) -> None:
        self.dev.submit(recordings)
        if self.profile:
            for rec in recordings:
                self.dev.collect(rec)

    def kernel_times(self) -> dict[str, tuple[float, int]]:
        """Per kernel name: GPU ms and dispatches summed over every profiled submission (slowest first)."""
        if not self.profile:
            raise LlmoptError("kernel_times: the decoder was not made with profile=True")
        times, counts = {}, {}
        for rec in (*self.loads, *self.advances, self.body, *self.greedy_tails, self.logits_tail):
            for name, ms in rec.times.items():
                times[name] = times.get(name, 0.0) + ms
                counts[name] = counts.get(name, 0) + rec.counts[name]
        return {name: (ms, counts[name]) for name, ms in sorted(times.items(), key=lambda kv: -kv[1])}

    def close(self) -> None:
        """Free the recording and its buffers (also on garbage collection); the decoder is unusable afterwards."""
        dev = self.dev
        if dev.device is None:
            return
        for rec in (self.body, self.logits_tail, *self.loads, *self.advances, *self.greedy_tails):
            if rec is not None:
                dev.free_recording(rec)
        self.body, self.logits_tail, self.loads, self.advances, self.greedy_tails = None, None, [], [], []
        self.logits = None  # its buffer returns to the private pool
        self.be.free_pool(self._pool)
        if self.chain is not None:
            self.chain.free()
            self.chain = None
        for buf in self._resources:
            dev.free(buf)
        self._resources = []

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the device may already be gone
            pass
