"""The norms on the Vulkan device: RMSNorm (plain and Gemma's 1 + w gains, whole rows or groups), the residual add
fused with the norm after it, Gemma's sandwich post norm with both, and LayerNorm.

    h = be.rmsnorm(x, w, eps, unit_offset)                              # also group=head_dim (q/k norms)
    total, h = be.add_rmsnorm(residual, x, w, eps, unit_offset)         # residual + x, and its norm: one dispatch
    total, h = be.norm_add_rmsnorm(residual, x, post, w, eps, unit_offset)  # residual + rmsnorm(x, post), its norm

``VulkanBackend`` (``llmopt.backends.vulkan.backend``) takes these ops from ``NormOps``. Each writes its normed
output also as x8 rows (``VulkanBackend._normed``) where an int-dot mat-vec may read them; ``add_rmsnorm`` holds a
row in registers where it fits (``norm_regs_max``), else passes over memory. Folded into the mat-vec before them
(``linear_add_rmsnorm``, ``llmopt.backends.vulkan.producer_norm``) they measured faster on Qwen2.5-7B (v16), and
Gemma's sandwich norms too once each row's last workgroup finished them coalesced (``linear_norm_add_rmsnorm``,
v21; v17's uncoalesced tail was slower); folded into the mat-vecs after them (v15), slower (docs/benchmarks.md).
"""

from __future__ import annotations

from llmopt.backends.vulkan.device import Buffer, pack_push
from llmopt.errors import LlmoptError


class NormOps:
    """``VulkanBackend``'s norms (see the module docstring)."""

    def rmsnorm(self, x, weight, eps, unit_offset, group=None):
        group = group or x.features
        if x.features % group:
            raise LlmoptError(f"rmsnorm: {x.features} features are not a multiple of the group {group}")
        self._check_norm_weight("rmsnorm", weight, group)
        out, x8 = self._normed(x.shape, group if group == x.features else None)
        n_chunks = x.rows * (x.features // group)
        push = pack_push("IffI", group, float(eps), 1.0 if unit_offset else 0.0, n_chunks)
        self._run("rmsnorm", 4, x8, [self._whole(x.buf), self._whole(weight), self._whole(out.buf),
                                                    self._whole(out.q8 or self.dummy)], push, self._grid(n_chunks))
        return out

    def add_rmsnorm(self, a, b, weight, eps, unit_offset):
        """``(a + b, rmsnorm(a + b))`` in one dispatch: the residual add and the norm after it (whole rows). Folded
        into the mat-vecs that read it instead, it measured slower (docs/benchmarks.md, v15); folded into the mat-vec
        before it (``linear_add_rmsnorm``), faster (v16)."""
        return self._add_rmsnorm(a, b, None, weight, eps, unit_offset)

    def norm_add_rmsnorm(self, a, b, post_weight, weight, eps, unit_offset):
        """``(s, rmsnorm(s))`` with ``s = a + rmsnorm(b, post_weight)`` (Gemma's sandwich norm after attention or the
        FFN, the residual add, the next norm) in one dispatch; ``fuse_post_norm`` off: ``rmsnorm`` then
        ``add_rmsnorm``."""
        if not self.fuse_post_norm:
            return self.add_rmsnorm(a, self.rmsnorm(b, post_weight, eps, unit_offset), weight, eps, unit_offset)
        return self._add_rmsnorm(a, b, post_weight, weight, eps, unit_offset)

    def _add_rmsnorm(self, a, b, post_weight, weight, eps, unit_offset):
        op = "add_rmsnorm" if post_weight is None else "norm_add_rmsnorm"
        if a.shape != b.shape:
            raise LlmoptError(f"{op}: shapes {list(a.shape)} and {list(b.shape)} differ")
        for w in (weight, post_weight):
            if w is not None:
                self._check_norm_weight(op, w, a.features)
        total, (out, x8) = self._new(a.shape), self._normed(a.shape, a.features)
        per = -(-a.features // self.wg_reduce)  # values an invocation holds in registers (0: passes over memory)
        per = per if per <= self.norm_regs_max else 0
        push = pack_push("IffI", a.features, float(eps), 1.0 if unit_offset else 0.0, a.rows)
        self._run("add_rmsnorm", 7, (*x8, per, int(post_weight is not None)),
                  [self._whole(a.buf), self._whole(b.buf), self._whole(weight), self._whole(total.buf),
                   self._whole(out.buf), self._whole(out.q8 or self.dummy), self._whole(post_weight or self.dummy)],
                  push, self._grid(a.rows))
        return total, out

    @staticmethod
    def _check_norm_weight(op: str, weight: Buffer, n: int) -> None:
        if weight.nbytes < 4 * n:  # the shader would read past it
            raise LlmoptError(f"{op}: the norm weight holds {weight.nbytes // 4} values, {n} features need one each")

    def layernorm(self, x, weight, bias, eps):
        out = self._new(x.shape)
        push = pack_push("IfI", x.features, float(eps), x.rows)
        self._run("layernorm", 4, (),
                  [self._whole(x.buf), self._whole(weight), self._whole(bias), self._whole(out.buf)], push,
                  self._grid(x.rows))
        return out
