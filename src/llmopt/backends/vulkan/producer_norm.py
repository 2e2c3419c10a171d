"""The residual add and the next RMSNorm folded into the mat-vec before them (the o and down projections).

    new_residual, normed = be.linear_add_rmsnorm(x, w_o, residual, ffn_norm, eps, unit_offset)
    gate_up = be.gated_linears(normed, w_gate, w_up, "silu")   # reads normed's x8 rows, applies 1 / rms itself

``Model._block`` calls this instead of ``linear`` then ``add_rmsnorm`` (plain pre-norm layers; Gemma's sandwich norms
keep ``norm_add_rmsnorm``). Where the fold applies (``fuse_producer_norm``, the int4 int-dot mat-vec over x8 rows,
one weight piece, a multiple of 32 outputs, decode rows), one dispatch of ``matvec_quant_idot`` with ``NORM_OUT``
(``shaders/matvec_quant.glsl``), laid out by ``norm_layout`` so that each workgroup owns whole 32-output chunks,
writes h = residual + x W^T (the new residual), the x8 rows of h * (w + offset), and its partial sum of h^2 (one
float a workgroup, no atomics: no workgroup waits for another). The norm's 1 / rms is a positive factor common to
the whole row, so it leaves every chunk's int8 codes unchanged: the int-dot mat-vecs reading those rows add the
partials (a few hundred bytes) and scale their sums by it (``X_RMS``). The normed handle has no floats until an op
reads them (a non-int4 or prefill reader, ``to_host``): then ``FoldedNorm.materialize`` records an ``rmsnorm`` of
the new residual, so every reader stays correct. Elsewhere: ``linear`` then ``add_rmsnorm``, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmopt.backends.vulkan.device import Buffer, pack_push
from llmopt.errors import LlmoptError


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
    """``VulkanBackend``'s ``linear_add_rmsnorm`` (see the module docstring)."""

    def _init_producer_norm(self, spec: dict) -> None:
        self.fuse_producer_norm = bool(spec.get("matvec_norm", 0))
        # the folding mat-vec's (wg, invocations a set, rows a set): sets * rows outputs a workgroup, whole chunks
        self.norm_layout = tuple(int(v) for v in spec.get("matvec_norm_layout", (64, 8, 4)))

    def linear_add_rmsnorm(self, x, weight, residual, norm_weight, eps, unit_offset):
        """``(r, rmsnorm(r))`` with ``r = residual + x weight^T``: the projection, the residual add and the next
        norm, in one mat-vec where the fold applies (module docstring), else ``linear`` then ``add_rmsnorm``."""
        from llmopt.backends.vulkan.backend import MATVEC_MAX_M, VkAct  # imports this module

        if x.features != weight.k:
            raise LlmoptError(f"linear_add_rmsnorm {weight.name}: input has {x.features} features, weight expects "
                              f"{weight.k}")
        fold = (self.fuse_producer_norm and self.matvec_int_dot and self.matvec_x_q8
                and self.dev.features["integer_dot_product"] and weight.bits == 4 and len(weight.pieces) == 1
                and weight.n_out % 32 == 0 and x.rows <= MATVEC_MAX_M and x.rms is None
                and tuple(residual.shape) == (*x.shape[:-1], weight.n_out))
        if not fold:
            return self.add_rmsnorm(residual, self.linear(x, weight), norm_weight, eps, unit_offset)
        self._check_norm_weight("linear_add_rmsnorm", norm_weight, weight.n_out)
        per = self._norm_sets()[1]
        rows, f = x.rows, weight.n_out
        total = self._new(residual.shape)
        n_parts = -(-f // per)
        folded = FoldedNorm(self._alloc(4 * rows * n_parts, "rms partials"), n_parts, float(eps), total, norm_weight,
                            bool(unit_offset))
        normed = VkAct(self, None, residual.shape, self._alloc(rows * 160 * -(-f // 128), "x8"), folded)
        self._matmul(x, weight, [total], rows, 1, 0, norm=(residual, norm_weight, 1.0 if unit_offset else 0.0, normed))
        return total, normed

    def _norm_sets(self) -> tuple[int, int]:
        """The folding mat-vec's row sets a workgroup and outputs a workgroup (``norm_layout``, checked)."""
        wg, split, rows = self.norm_layout
        most = int(self.probe["device"]["max_workgroup_invocations"])
        sets = wg // split if split else 1
        if wg & (wg - 1) or wg > most or rows < 1 or (sets * rows) % 32 or sets * rows > wg:
            raise LlmoptError(f"norm_layout {self.norm_layout}: expected (workgroup size, a power of two up to the "
                              f"device's {most}; invocations a set; rows a set), with sets * rows a multiple of 32 "
                              "and at most the workgroup size (an invocation an output)")
        per = sets * rows
        return self._matvec_sets(wg, rows, split, per + per // 32), per
