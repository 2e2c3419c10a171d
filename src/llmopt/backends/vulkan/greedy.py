"""The greedy tail of ``VulkanBackend``: ``argmax`` over many workgroups a row, Gemma's final softcap folded in.

    ids = be.argmax(be.logits_device(x, head, softcap))     # [B] int64; 4 bytes a sequence come back
    be._argmax(logits, (buf, offset, 4 * B), 30.0)          # recorded: the replayed step's tail caps and picks at once

``shaders/argmax.comp``: each of ``argmax_groups`` workgroups a row (the device's SMs where it says, so one wave)
reduces a contiguous slice to (max, lowest index of it) and counts itself in on the row's arrival counter; the last
to arrive reduces the partials and writes the id (lowest index on ties, as one workgroup scanning the row: a single
workgroup a row took 32-36 us of a token on an H100, docs/benchmarks.md v24). With ``softcap`` each value is capped
as it is read, exactly as ``logits_softcap.comp`` caps it, and written back, so the replayed greedy step needs no
separate softcap dispatch (``replay.VulkanDecoder``).
"""

from __future__ import annotations

import numpy as np
import torch

from llmopt.backends.vulkan.device import pack_push

ARGMAX_ROWS = 1024  # rows a dispatch reduces (arrival counters); more rows go in several dispatches
MAX_GROUPS = 65535  # workgroups a grid dimension every device supports: a row's at most


class GreedyOps:
    """``VulkanBackend``'s ``argmax`` and the softcap it may fold (see the module docstring)."""

    def _init_greedy(self) -> None:
        # workgroups a row: one an SM where the device says (one wave, every slice in flight), else a few (CPUs)
        self.argmax_groups = int(self.dev.info.get("sm_count", 0)) or 4
        self._argmax_arrivals = self.dev.buffer(4 * ARGMAX_ROWS, name="argmax arrivals")
        self.dev.upload(self._argmax_arrivals, np.zeros(ARGMAX_ROWS, np.uint32))

    def argmax(self, logits) -> torch.Tensor:
        """Greedy ids ``[B]`` (int64) of device logits ``[B, vocab]``: 4 bytes per sequence come back."""
        idx = self._alloc(4 * logits.rows, "argmax")
        self._argmax(logits, self._whole(idx))
        out = self.dev.download(idx, 4 * logits.rows, np.uint32)
        self._release(idx)
        self._submitted()
        return torch.from_numpy(out.astype(np.int64))

    def _argmax(self, logits, idx: tuple, softcap: float | None = None) -> None:
        """Record the greedy ids of ``logits [rows, n]`` into the binding ``idx`` (buffer, offset, range; uint32 a
        row); ``softcap``: the logits capped in place first (``_softcap``'s values), the ids those of the capped
        logits."""
        rows, n = logits.rows, logits.features
        groups = max(1, min(self.argmax_groups, -(-n // self.wg_reduce), MAX_GROUPS))  # none without values
        parts = self._alloc(8 * rows * groups, "argmax partials")
        for row0 in range(0, rows, ARGMAX_ROWS):
            push = pack_push("IIIIf", n, min(ARGMAX_ROWS, rows - row0), groups, row0, float(softcap or 0.0))
            self._run("argmax", 4, (), [self._whole(logits.buf), idx, self._whole(parts),
                                        self._whole(self._argmax_arrivals)], push,
                      (groups, min(ARGMAX_ROWS, rows - row0), 1))
        self._release(parts)

    def _softcap(self, logits, softcap: float) -> None:
        """Record ``logits = softcap * tanh(logits / softcap)`` in place (Gemma 2's final logit softcap)."""
        n = logits.rows * logits.features
        self._run("logits_softcap", 1, (), [self._whole(logits.buf)], pack_push("If", n, float(softcap)),
                  self._grid(-(-n // self.wg)))
