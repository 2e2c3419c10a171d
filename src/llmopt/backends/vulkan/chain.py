"""Chained dispatches: the replayed decode step's dependent dispatches ordered by a counter in memory, not barriers.

Between two dependent dispatches a pipeline barrier makes the GPU drain the first (every workgroup retired, caches
flushed) before it launches the second: a few µs of launch and retire each, paid five times a layer by the
replayed step (docs/benchmarks.md, Vulkan). Here the step's dispatches are recorded with no barrier between them
and order themselves: the step owns a device buffer holding a counter and an error word, zeroed by the step's
prologue (``record_reset``). Each chained dispatch i gets a ticket T_i, the number of workgroups of the step's
chained dispatches recorded before it, as the last word of its push constants; every one of its workgroups waits
until the counter reaches T_i, runs, makes its writes visible and adds 1 (``shaders/chain.glsl``,
``chain_main.glsl``: the ``{shader}_chain.spv`` builds). The counter reaches T_i only when every workgroup of
dispatches 0..i-1 has finished, so every earlier write is done. Shaders without a chained build, dispatches of
over ``MAX_GROUPS`` workgroups and copies get the usual barrier; the tickets stay right across them (a barrier only
means the counter has already reached them). While a body is recorded chained, the backend gives every activation
a fresh buffer (``VulkanBackend._alloc``): each is written once a step, after the barrier that begins the step, so
no read can hit a cache line of it from before its producer wrote it and no write can overtake an earlier read;
activations stay plain cached loads (coherent ones, which bypass the L1, made the mat-vecs up to 2x slower).
The chained mat-vecs issue their first weight loads before the wait (``chain_early`` chunks a row, shader
constant ``EARLY``): weights never change, and their DRAM streaming then overlaps the previous dispatch's tail.
The chained decode attention likewise loads this step's RoPE rows and its chunk's first cached keys and values
before its wait (``shaders/rope_attention.glsl``; at short contexts every cached value that fits its shared memory).

This needs the GPU to launch a queue's workgroups in recording order (an earlier dispatch's workgroups resident
before a later one's wait for them); a wait gives up after a bounded poll, sets the error word (its ticket + 1),
skips its work and signals, and ``check`` (after the step, from the copy ``record_readback`` put in the tail)
raises an ``LlmoptError`` naming the dispatch. ``check`` also raises where the counter did not end at the step's
workgroup count. Lavapipe runs one dispatch after another, so there every wait passes at once: CI checks the
results, the tickets and the counter, not the overlap.

    mode = chain_mode(backend.decode_chain, model.args, backend.fuse_sandwich_norm)  # "auto" resolved per model
    chain = Chain(dev, mode)                                # "chain", or "no barriers" (timing only: races)
    ...prologue...; chain.record_reset()
    dev.chain = chain; ...record the body...; dev.chain = None
    ...tail...; chain.record_readback(host_buffer)
    dev.submit(...); chain.check(host_buffer)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from llmopt.errors import LlmoptError

CHAIN_BINDING = 15  # shaders/chain.glsl: the counter's binding; bindings below it that a shader lacks get any buffer
TICKET_OFFSET = 124  # byte of the ticket in the 128 bytes of push constants (CHAIN_TICKET_MEMBER)
# Dispatches of more workgroups go behind a barrier: each workgroup's poll and signal cost an L2 round trip and an
# atomic on one word, and many waves of them cost more than the barrier (H200: the Qwen2.5-7B head's 38016
# workgroups chained took 220 us instead of 80; v18). 1024 and 8192 measured no better (v19).
MAX_GROUPS = 4096
# "auto" (the GPU default): chained where measured faster: steps without Gemma's sandwich norms (H200, v18:
# Qwen2.5-7B 1.05x, Gemma 2 9B 0.90x; v19: Gemma still slower with every other wait tried), or with them folded
# into the o and down mat-vecs (no single-workgroup norm dispatches left; H100, v21: Gemma 2 9B 1.05-1.06x against
# the fold on barriers), so only Gemma without the fold stays on barriers; "chain": always;
# "no barriers": the body recorded with no barrier and no tickets, wrong results (bench/vulkan_decode.py's bound of
# what chaining can win, timing only); "off".
MODES = ("auto", "chain", "no barriers", "off")


def chain_mode(mode: str, args, sandwich_fold: bool) -> str:
    """The mode a replayed step of a model of ``args`` (``ModelArgs``) records with under backend mode ``mode``;
    ``sandwich_fold``: the backend folds sandwich norms into the mat-vecs before them (``fuse_sandwich_norm``)."""
    if mode not in MODES:
        raise LlmoptError(f"decode chain mode {mode!r}: expected one of {', '.join(repr(m) for m in MODES)}")
    if mode == "auto":
        return "off" if args.sandwich_norm and not sandwich_fold else "chain"
    return mode


@dataclass
class Link:
    """One chained dispatch: its label, workgroups and ticket."""

    label: str
    groups: int
    ticket: int


class Chain:
    """The counter of one recorded step and the tickets of its dispatches; see the module docstring."""

    def __init__(self, dev, mode: str):
        if mode not in ("chain", "no barriers"):
            raise LlmoptError(f"Chain: mode {mode!r} records nothing chained (expected 'chain' or 'no barriers')")
        self.dev, self.mode = dev, mode
        self.buf = dev.buffer(16, name="decode chain")  # [counter, error word]
        self.links: list[Link] = []
        self.count = 0  # workgroups of the chained dispatches recorded so far: the next ticket
        self.linkable = False  # the command recorded last was a chained dispatch (Device.dispatch, Device._barrier)

    def variant(self, pipe, key: tuple, push: bytes, groups: tuple, label: str) -> tuple | None:
        """(pipeline, bindings, push constants) of a dispatch of ``pipe`` recorded chained, or None where its shader
        has no chained build or more than ``MAX_GROUPS`` workgroups (it goes behind a barrier as usual)."""
        if self.mode == "no barriers":
            return pipe, key, push
        n = groups[0] * groups[1] * groups[2]
        if not self.has_build(pipe.name) or len(key) > CHAIN_BINDING or n > MAX_GROUPS:
            return None
        self.links.append(Link(label, n, self.count))
        ticket, self.count = self.count, self.count + n
        whole = (self.buf, 0, self.buf.nbytes)
        key = key + (whole,) * (CHAIN_BINDING - len(key)) + (whole,)
        push = push.ljust(TICKET_OFFSET, b"\0") + struct.pack("<I", ticket)
        return self.dev.pipeline(f"{pipe.name}_chain", CHAIN_BINDING + 1, pipe.spec), key, push

    def has_build(self, shader: str) -> bool:
        """Whether ``shader`` has a chained build (``{shader}_chain.spv``) to record its dispatches with."""
        return (self.dev.spv_dir / f"{shader}_chain.spv").exists()

    def record_reset(self) -> None:
        """Record the counter and error word zeroed (in the step's prologue: ordered before the body by its
        first barrier)."""
        if self.mode != "chain":
            return
        dev = self.dev
        dev._begin()
        dev._barrier("transfer")
        dev.lib.vkCmdFillBuffer(dev.cmd, self.buf.handle, 0, self.buf.nbytes, 0)
        dev._after("transfer")

    def record_readback(self, host) -> None:
        """Record a copy of the counter and error word into host-visible ``host`` (8 bytes; in the step's tail)."""
        if self.mode == "chain":
            self.dev.copy(self.buf, host, 8)

    def check(self, host) -> None:
        """Raise if the step read back into ``host`` timed out in a wait or ended with a wrong counter."""
        if self.mode != "chain":
            return
        count, error = (int(v) for v in host.view(np.uint32, 2))
        if error:
            late = next((f"dispatch {i} ({link.label})" for i, link in enumerate(self.links)
                         if link.ticket == error - 1), "a dispatch")
            raise LlmoptError(f"chained dispatches timed out: {late} waited for ticket {error - 1} past its poll "
                              f"limit (the counter ended at {count} of {self.count}): this device does not launch "
                              "dispatches in order; set chain off (VulkanBackend.decode_chain = 'off')")
        if count != self.count:
            raise LlmoptError(f"chained dispatches: the step's counter ended at {count}, not at its {self.count} "
                              "workgroups: a chained dispatch lost or repeated its signal")

    def free(self) -> None:
        self.dev.free(self.buf)
