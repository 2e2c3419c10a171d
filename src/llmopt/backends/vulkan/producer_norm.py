"""The residual add and the next RMSNorm folded into the mat-vec before them (the o and down projections).

    new_residual, normed = be.linear_add_rmsnorm(x, w_o, residual, ffn_norm, eps, unit_offset)
    gate_up = be.gated_linears(normed, w_gate, w_up, "silu")   # reads normed's x8 rows, applies 1 / rms itself
    new_residual, normed = be.linear_norm_add_rmsnorm(x, w_o, residual, post_attn_norm, ffn_norm, eps, True)  # Gemma

``Model._block`` calls these instead of ``linear`` then ``add_rmsnorm`` (plain pre-norm layers) or ``norm_add_rmsnorm``
(Gemma's sandwich norms). Where the fold applies (``fuse_producer_norm``, the int4 int-dot mat-vec over x8 rows, one
weight piece, a multiple of 32 outputs, decode rows), one dispatch of ``matvec_quant_idot`` with ``NORM_OUT``
(``shaders/matvec_quant.glsl``), laid out by ``norm_layout`` so that each workgroup owns whole 32-output chunks, writes
h = residual + x W^T (the new residual), the x8 rows of h * (w + offset), and its partial sum of h^2 (one float a
workgroup, no atomics: no workgroup waits for another). The norm's 1 / rms is a positive factor common to the whole row,
so it leaves every chunk's int8 codes unchanged: the int-dot mat-vecs reading those rows add the partials (a few hundred
bytes) and scale their sums by it (``X_RMS``). The normed handle has no floats until an op reads them (a non-int4 or
prefill reader, ``to_host``): then ``FoldedNorm.materialize`` records an ``rmsnorm`` of the new residual, so every
reader stays correct. Elsewhere: ``linear`` then ``add_rmsnorm``, as before.

The first block's norm has no mat-vec before it: ``embedding_rmsnorm`` folds it into the embedding lookup instead
(``shaders/embedding_norm.comp``, the same outputs: each workgroup owns whole chunks of a row and writes their x8 rows
and its partial sum of squares), where the int-dot mat-vec reads x8 rows (``matvec_x_q8``) and the table is one piece
(``fuse_embedding_norm``).

Gemma's sandwich norms (``linear_norm_add_rmsnorm``, ``fuse_sandwich_norm``): r = residual + rmsnorm(x W^T, post)
needs the rms of the whole projection d = x W^T before the add, which no workgroup has alone. The same mat-vec, laid
out by its own ``sandwich_layout`` (the two folds' fastest layouts differ, v23), with ``NORM_OUT = 2`` writes d, and
each row's last workgroup to arrive (a counter a row, ``_arrivals``, which that workgroup puts back to 0) finishes the
row with all its invocations, coalesced: r, the x8 rows of r times the next gain, and one partial sum of r^2 a row for
the readers. Otherwise ``linear`` then ``norm_add_rmsnorm``.
In a chained recording (``dev.chain``), where the row's workgroups are at most the device's SMs (all resident at
once: ``sandwich_grid_max``), the grid form (``NORM_OUT = 3``) instead: every workgroup stores its partial sum of
d^2 into a tagged slot (``_grid_slots``), waits until the row's others show this dispatch's tag (bounded; a time-out
raises through the chain's error word, naming the dispatch) and finishes its own outputs as the plain fold does,
one partial of r^2 a workgroup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmopt.backends.vulkan.device import Buffer, pack_push
from llmopt.errors import LlmoptError

GRID_GROUPS = 256  # the grid form's most workgroups a row (its slots' regions); shaders/matvec_quant.glsl, GRID_ROWS


@dataclass(eq=False)
class FoldedNorm:
    """A norm whose 1 / rms its readers apply: ``parts`` holds ``n_parts`` partial sums of squares a row of
    ``residual`` (its input, the new residual stream), normed with ``weight`` (+ 1 where ``unit_offset``)."""

    parts: Buffer
    n_parts: int
    eps: float
    residual: object  # VkAct
    weight: Buffer
    unit_offset: bool

    def materialize(self, act) -> Buffer:
        """Record ``rmsnorm(residual)`` into a new buffer: the floats of the normed handle ``act``."""
        be, res = act.backend, self.residual
        out = be._alloc(4 * res.rows * res.features)
        push = pack_push("IffI", res.features, float(self.eps), 1.0 if self.unit_offset else 0.0, res.rows)
        be._run("rmsnorm", 4, (0, 1), [be._whole(res.buf), be._whole(self.weight), be._whole(out),
                                       be._whole(be.dummy)], push, be._grid(res.rows))
        return out


class ProducerNormOps:
    """``VulkanBackend``'s ``linear_add_rmsnorm`` and ``linear_norm_add_rmsnorm`` (see the module docstring)."""

    def _init_producer_norm(self, spec: dict) -> None:
        self.fuse_producer_norm = bool(spec.get("matvec_norm", 0))
        # the folding mat-vec's (wg, invocations a set, rows a set): sets * rows outputs a workgroup, whole chunks
        self.norm_layout = tuple(int(v) for v in spec.get("matvec_norm_layout", (64, 8, 4)))
        # the sandwich fold's (Gemma's post norms, NORM_OUT 2 / 3), the same form
        self.sandwich_layout = tuple(int(v) for v in spec.get("matvec_sandwich_layout", self.norm_layout))
        self.fuse_sandwich_norm = self.fuse_producer_norm  # Gemma's post norm too (the row's last workgroup)
        self.fuse_embedding_norm = self.fuse_producer_norm  # the first block's norm into the embedding
        self.sandwich_tail_max = 16  # the tail holds up to this many values of the row an invocation in registers
        # the grid form's most workgroups (one an SM, surely resident at once; 0: the device does not say, no grid)
        self.sandwich_grid_max = int(self.dev.info.get("sm_count", 0))
        from llmopt.backends.vulkan.backend import MATVEC_MAX_M  # imports this module

        # per input row, the workgroups of a sandwich-folding mat-vec that have stored their part (0 between them)
        self._arrivals = self.dev.buffer(4 * MATVEC_MAX_M, name="sandwich arrivals")
        # the grid form's tagged partials: a region a workgroup count up to GRID_GROUPS, MATVEC_MAX_M rows of slots
        self._grid_slots = self.dev.buffer(4 * MATVEC_MAX_M * GRID_GROUPS * (GRID_GROUPS + 1) // 2, name="grid slots")
        self.reset_arrivals()

    def reset_arrivals(self) -> None:
        """Zero the sandwich rows' arrival counters and the grid form's slots (each row's last workgroup zeroes its
        counter, and a grid dispatch leaves its row's slots one tag, unless a chained step that timed out skipped some
        workgroups' work: ``VulkanDecoder`` calls this before it raises)."""
        for buf in (self._arrivals, self._grid_slots):
            self.dev.upload(buf, np.zeros(buf.nbytes // 4, np.uint32))

    def linear_add_rmsnorm(self, x, weight, residual, norm_weight, eps, unit_offset):
        """``(r, rmsnorm(r))`` with ``r = residual + x weight^T``: the projection, the residual add and the next
        norm, in one mat-vec where the fold applies (module docstring), else ``linear`` then ``add_rmsnorm``."""
        if not (self.fuse_producer_norm and self._foldable("linear_add_rmsnorm", x, weight, residual)):
            return self.add_rmsnorm(residual, self.linear(x, weight), norm_weight, eps, unit_offset)
        self._check_norm_weight("linear_add_rmsnorm", norm_weight, weight.n_out)
        total = self._new(residual.shape)
        normed = self._folded(total, -(-weight.n_out // self._norm_sets("norm_layout")[1]), norm_weight, eps,
                              unit_offset)
        self._matmul(x, weight, [total], x.rows, 1, 0,
                     norm=(residual, norm_weight, 1.0 if unit_offset else 0.0, normed, None))
        return total, normed

    def embedding_rmsnorm(self, ids, table, scale, norm_weight, eps, unit_offset):
        """``(x, rmsnorm(x))`` with ``x = embedding(ids, table, scale)``: the first block's input and its attention
        norm, in one dispatch where the fold applies (module docstring), else ``embedding`` then ``rmsnorm``."""
        return self._embed_norm(*self._bound_ids(ids, table), table, scale, norm_weight, eps, unit_offset)

    def _embed_norm(self, ids: tuple, shape: tuple, table, scale, norm_weight, eps, unit_offset) -> tuple:
        """``embedding_rmsnorm`` of the uint32 ids bound at ``ids`` (buffer, offset, range), ``shape`` of them."""
        f, rows = table.k, math.prod(shape)
        per = max(32, self.wg)  # values a workgroup: whole 32-value chunks, every invocation busy
        if not (self.fuse_embedding_norm and self._rms_readers(rows) and rows > 0 and len(table.pieces) == 1
                and f % per == 0 and per % self.wg == 0 and 4 * (per + per // 32 + self.wg) <= self._shared_limit()):
            x = self._embed(ids, shape, table, scale)
            return x, self.rmsnorm(x, norm_weight, eps, unit_offset)
        self._check_norm_weight("embedding_rmsnorm", norm_weight, f)
        x = self._new((*shape, f))
        n_parts = f // per
        normed = self._folded(x, n_parts, norm_weight, eps, unit_offset)
        pc = table.pieces[0]
        push = pack_push("IIIIff", f, table.group, rows, per, float(scale), 1.0 if unit_offset else 0.0)
        self._run("embedding_norm", 8, (table.bits, int(table.scale_bf16), int(table.has_zeros), 1, per + per // 32),
                  [ids, pc.w, pc.s or self._whole(self.dummy), pc.z or self._whole(self.dummy), self._whole(x.buf),
                   self._whole(norm_weight), self._whole(normed.rms.parts), self._whole(normed.q8)], push,
                  self._grid(rows * n_parts))
        return x, normed

    def linear_norm_add_rmsnorm(self, x, weight, residual, post_weight, norm_weight, eps, unit_offset):
        """``(r, rmsnorm(r))`` with ``r = residual + rmsnorm(x weight^T, post_weight)`` (Gemma's sandwich norm after
        the o or down projection, the residual add, the next norm), in one mat-vec where the fold applies (module
        docstring), else ``linear`` then ``norm_add_rmsnorm``."""
        f = weight.n_out
        if not (self.fuse_sandwich_norm and self._foldable("linear_norm_add_rmsnorm", x, weight, residual)
                and self._sandwich_spec(f) is not None):
            return self.norm_add_rmsnorm(residual, self.linear(x, weight), post_weight, norm_weight, eps, unit_offset)
        self._check_norm_weight("linear_norm_add_rmsnorm", post_weight, f)
        self._check_norm_weight("linear_norm_add_rmsnorm", norm_weight, f)
        total, branch = self._new(residual.shape), self._new(residual.shape)
        per = self._norm_sets("sandwich_layout")[1]
        n_parts = -(-f // per) if self._sandwich_grid(f) else 1  # the grid's: one a workgroup
        normed = self._folded(total, n_parts, norm_weight, eps, unit_offset)
        self._matmul(x, weight, [branch, total], x.rows, 1, 0,
                     norm=(residual, norm_weight, 1.0 if unit_offset else 0.0, normed, post_weight))
        return total, normed

    def _foldable(self, op: str, x, weight, residual) -> bool:
        """Whether the o or down projection ``weight`` of ``x`` can fold the norm after it (``op``: either kind)."""
        if x.features != weight.k:
            raise LlmoptError(f"{op} {weight.name}: input has {x.features} features, weight expects {weight.k}")
        return (self._rms_readers(x.rows) and weight.bits == 4 and len(weight.pieces) == 1 and weight.n_out % 32 == 0
                and x.rms is None and tuple(residual.shape) == (*x.shape[:-1], weight.n_out))

    def _rms_readers(self, rows: int) -> bool:
        """Whether the readers of ``rows`` normed rows can apply the norm's 1 / rms themselves: int-dot mat-vecs over
        x8 rows (decode rows), the condition every fold here shares."""
        from llmopt.backends.vulkan.backend import MATVEC_MAX_M  # imports this module

        return (self.matvec_int_dot and self.matvec_x_q8 and self.dev.features["integer_dot_product"]
                and rows <= MATVEC_MAX_M)

    def _folded(self, residual, n_parts: int, norm_weight, eps, unit_offset):
        """The normed handle of a fold over ``residual`` (``VkAct``): its x8 rows and ``n_parts`` partial sums of
        squares a row to be written by the folding dispatch, no floats until a reader needs them (``FoldedNorm``)."""
        from llmopt.backends.vulkan.backend import VkAct  # imports this module

        rows, f = residual.rows, residual.features
        folded = FoldedNorm(self._alloc(4 * rows * n_parts, "rms partials"), n_parts, float(eps), residual,
                            norm_weight, bool(unit_offset))
        return VkAct(self, None, residual.shape, self._alloc(rows * 160 * -(-f // 128), "x8"), folded)

    def _sandwich_spec(self, f: int) -> tuple[int, int] | None:
        """(TAIL_PER, X8_LEN) of the sandwich tail over rows of ``f``, or None where the row does not fit the
        tail's registers or the workgroup's shared memory beside the mat-vec's own arrays."""
        wg, split, rows = self.sandwich_layout
        per = -(-f // wg)
        if per > self.sandwich_tail_max or 4 * (rows * wg + wg + f + f // 32) + 16 > self._shared_limit():
            return None
        return per, f + f // 32

    def _sandwich_grid(self, f: int) -> bool:
        """Whether the sandwich fold over rows of ``f`` takes the grid form: recorded chained (its wait's time-out
        reported through the chain's error word), its workgroups all resident (at most ``sandwich_grid_max``) and
        at most its invocations (each polls one workgroup's slot)."""
        # chained as Chain.variant records it: its chained build exists (its other condition, at most MAX_GROUPS
        # workgroups, holds: GRID_GROUPS a row, MATVEC_MAX_M rows)
        chain = self.dev.chain
        chained = chain is not None and chain.mode == "chain" and chain.has_build("matvec_quant_idot")
        groups = -(-f // self._norm_sets("sandwich_layout")[1])
        return chained and groups <= min(self.sandwich_grid_max, GRID_GROUPS, self.sandwich_layout[0])

    def _norm_dispatch(self, norm: tuple, n_out: int) -> tuple:
        """``VulkanBackend._matmul``'s folding mat-vec for ``norm`` = (residual, norm weight, offset, normed, post
        weight or None): its layout (``sandwich_layout`` with a post weight, else ``norm_layout``), sets, x8 buffer
        and (Q8, X8_LEN), partials a row, eps, NORM_OUT (3: a sandwich norm's grid form, ``_sandwich_grid``), TAIL_PER
        and bindings 9-13 (partials, residual, norm weight, post weight, the tail's arrival counters or the grid's
        slots)."""
        residual, norm_weight, _, normed, post = norm
        name = "norm_layout" if post is None else "sandwich_layout"
        sets, per = self._norm_sets(name)
        x8_out, norm_out, tail_per = (1, per + per // 32), 1, 1
        counters = self._arrivals
        if post is not None and self._sandwich_grid(n_out):  # Gemma's sandwich norm, each workgroup after a grid wait
            norm_out, counters = 3, self._grid_slots
        elif post is not None:  # Gemma's sandwich norm: the row's last workgroup finishes it, over the whole row
            norm_out, (tail_per, x8_len) = 2, self._sandwich_spec(n_out)
            x8_out = (1, x8_len)
        bindings = [self._whole(b) for b in (normed.rms.parts, residual.buf, norm_weight, post or self.dummy,
                                             counters)]
        return (getattr(self, name), sets, normed.q8, x8_out, normed.rms.n_parts, normed.rms.eps, norm_out, tail_per,
                bindings)

    def _norm_sets(self, name: str) -> tuple[int, int]:
        """The folding mat-vec's row sets a workgroup and outputs a workgroup in the layout ``name``
        (``norm_layout`` or ``sandwich_layout``, checked)."""
        layout = getattr(self, name)
        wg, split, rows = layout
        most = int(self.probe["device"]["max_workgroup_invocations"])
        sets = wg // split if split else 1
        if wg & (wg - 1) or wg > most or rows < 1 or (sets * rows) % 32 or sets * rows > wg:
            raise LlmoptError(f"{name} {layout}: expected (workgroup size, a power of two up to the "
                              f"device's {most}; invocations a set; rows a set), with sets * rows a multiple of 32 "
                              "and at most the workgroup size (an invocation an output)")
        per = sets * rows
        return self._matvec_sets(wg, rows, split, per + per // 32), per
