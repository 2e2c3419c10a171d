"""The decode step's norms on Vulkan (lavapipe in CI): ``add_rmsnorm`` and ``norm_add_rmsnorm`` (Gemma's sandwich
norm, the residual add and the next norm in one dispatch), against a float64 reference on fresh random inputs.

Both shader paths run: the row held in registers (``PER`` values an invocation) and the passes over memory (rows
longer than ``norm_regs_max`` values an invocation); they sum in the same order, so they agree bit for bit. Row
lengths that are not multiples of the workgroup, several rows, both norm offsets; the x8 rows the fused op writes
for the int-dot mat-vec; bad input; whole Gemma 2 models with the fused op against the separate ops, eager and
replayed, and the dispatches it saves. Tolerance: relative error below 2e-5 (float32 sums over a few hundred terms),
logits within the Vulkan tests' 1e-4 absolute.
"""

from __future__ import annotations

import pytest
import torch

from llmopt.engine import load_model
from llmopt.errors import LlmoptError

from vulkan_device import require_vulkan
vulkan = require_vulkan()
pytestmark = pytest.mark.vulkan

from test_vulkan_models import ATOL, FAMILIES, save_random  # noqa: E402
from test_vulkan_ops import rel_err  # noqa: E402
from test_vulkan_x8_gated import read_x8, x8_reference  # noqa: E402

RTOL = 2e-5


def rms(x: torch.Tensor, w: torch.Tensor, unit_offset: bool) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * ((1.0 if unit_offset else 0.0) + w.double())


def run_norm(be, a, b, w, post, unit_offset):
    """(sum, norm) from the device: ``add_rmsnorm`` without ``post``, else ``norm_add_rmsnorm``."""
    if post is None:
        total, out = be.add_rmsnorm(be.from_host(a), be.from_host(b), be.param("n", w), 1e-6, unit_offset)
    else:
        total, out = be.norm_add_rmsnorm(be.from_host(a), be.from_host(b), be.param("p", post), be.param("n", w),
                                         1e-6, unit_offset)
    return be.to_host(total), be.to_host(out)


@pytest.mark.parametrize("shape,wg_reduce", [((3, 2, 83), 16), ((1, 1, 1000), 64), ((1, 1, 96), 128), ((2, 1, 7), 16)])
@pytest.mark.parametrize("pre_norm", [False, True], ids=["add_rmsnorm", "norm_add_rmsnorm"])
@pytest.mark.parametrize("unit_offset", [False, True])
def test_norms_against_reference_both_paths(be, gen, monkeypatch, shape, wg_reduce, pre_norm, unit_offset):
    monkeypatch.setattr(be, "wg_reduce", wg_reduce)  # 1000 / 64: 16 a lane (a partial last one); 96 / 128: idle lanes
    f = shape[-1]
    a, b = torch.randn(*shape, generator=gen) * 2, torch.randn(*shape, generator=gen) * 3
    w, post = torch.randn(f, generator=gen), (torch.randn(f, generator=gen) if pre_norm else None)
    s = a.double() + (rms(b, post, unit_offset) if pre_norm else b.double())
    results = []
    for regs_max in (16, 0):  # registers (where the row fits), then passes over memory
        monkeypatch.setattr(be, "norm_regs_max", regs_max)
        total, out = run_norm(be, a, b, w, post, unit_offset)
        assert rel_err(total, s) < RTOL and rel_err(out, rms(s, w, unit_offset)) < RTOL
        if not pre_norm:
            assert torch.equal(total, a + b)  # the residual stream: a plain float32 add
        results.append((total, out))
    assert all(torch.equal(x, y) for x, y in zip(*results))  # same sums in the same order


@pytest.mark.parametrize("regs_max", [16, 0])
def test_fused_post_norm_equals_separate_ops(be, gen, monkeypatch, regs_max):
    monkeypatch.setattr(be, "norm_regs_max", regs_max)
    a, b = torch.randn(2, 1, 130, generator=gen), torch.randn(2, 1, 130, generator=gen) * 5
    w, post = torch.randn(130, generator=gen), torch.randn(130, generator=gen)
    fused = run_norm(be, a, b, w, post, True)
    monkeypatch.setattr(be, "fuse_post_norm", False)
    separate = run_norm(be, a, b, w, post, True)
    for x, y in zip(fused, separate):  # the same float32 steps (rmsnorm.comp's formula, add.comp's sum)
        assert torch.equal(x, y)


@pytest.mark.parametrize("k,m", [(96, 1), (288, 3), (512, 1)])
def test_norm_add_rmsnorm_writes_x8_rows(be, gen, monkeypatch, k, m):
    for key in ("matvec_int_dot", "matvec_x_q8"):
        monkeypatch.setattr(be, key, True)
    a, b = torch.randn(1, m, k, generator=gen), torch.randn(1, m, k, generator=gen)
    for regs_max in (16, 0):
        monkeypatch.setattr(be, "norm_regs_max", regs_max)
        _, out = be.norm_add_rmsnorm(be.from_host(a), be.from_host(b), be.param("p", torch.randn(k, generator=gen)),
                                     be.param("n", torch.randn(k, generator=gen)), 1e-6, True)
        assert out.q8 is not None
        values, scales, sums = read_x8(be, out)
        want, want_scales = x8_reference(be.to_host(out).reshape(m, k))
        diff = (values - want).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01  # the device's rounding of x * 127 / max
        assert rel_err(scales, want_scales) < 1e-6
        assert torch.equal(sums, values.sum(-1).to(torch.int32))


def test_bad_shapes(be, gen):
    a, w = be.from_host(torch.randn(3, 2, 40, generator=gen)), be.param("n", torch.ones(40))
    b = be.from_host(torch.randn(1, 2, 40, generator=gen))
    with pytest.raises(LlmoptError, match=r"^norm_add_rmsnorm: shapes \[3, 2, 40\] and \[1, 2, 40\] differ$"):
        be.norm_add_rmsnorm(a, b, w, w, 1e-6, True)
    with pytest.raises(LlmoptError, match=r"^add_rmsnorm: shapes \[3, 2, 40\] and \[1, 2, 40\] differ$"):
        be.add_rmsnorm(a, b, w, 1e-6, True)
    short = be.param("short", torch.ones(20))
    with pytest.raises(LlmoptError, match=r"^norm_add_rmsnorm: the norm weight holds 20 values, 40 features need"):
        be.norm_add_rmsnorm(a, a, short, w, 1e-6, True)
    with pytest.raises(LlmoptError, match=r"^add_rmsnorm: the norm weight holds 20 values, 40 features need one each$"):
        be.add_rmsnorm(a, a, short, 1e-6, True)
    with pytest.raises(LlmoptError, match=r"^rmsnorm: the norm weight holds 20 values, 40 features need one each$"):
        be.rmsnorm(a, short, 1e-6, True)


def test_gemma2_fused_post_norm_matches_separate_and_saves_dispatches(be, tmp_path, monkeypatch):
    """A tiny Gemma 2: eager and replayed decode with the fused sandwich norm equal the separate ops; the replayed
    step and every eager pass call ``rmsnorm`` once (the first layer's attention norm) instead of 1 + 2 a layer."""
    model = load_model(save_random(FAMILIES["gemma2"](), tmp_path, int(torch.randint(0, 2**31 - 1, ()))), backend=be)
    ids = torch.randint(0, model.args.vocab_size, (2, 9))
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(be, "fuse_post_norm", fused)
        for replay in (False, True):
            model.static_decode = replay
            calls = []
            rmsnorm = vulkan.VulkanBackend.rmsnorm
            monkeypatch.setattr(be, "rmsnorm", lambda *args, **kw: calls.append(1) or rmsnorm(be, *args, **kw))
            logits, state = model.prefill(ids[:, :3], max_len=ids.shape[1] + 1)
            steps = [logits]
            prefill_calls = len(calls)
            for t in range(3, ids.shape[1]):
                steps.append(model.decode_step(state, ids[:, t]))
            monkeypatch.undo()  # back to the defaults: the next run sets its own
            runs[fused, replay] = torch.stack(steps)
            layers = model.args.n_layers
            per_pass = 1 if fused else 1 + 2 * layers  # the first attention norm (+ the post norms of every layer)
            assert prefill_calls == per_pass  # an eager pass fuses each residual add with the next norm too
            if replay:  # recorded once, at the first decode step
                assert len(calls) - prefill_calls == per_pass
            monkeypatch.setattr(be, "fuse_post_norm", fused)
    model.static_decode = True
    base = runs[False, False]
    for key, logits in runs.items():
        assert (logits - base).abs().max().item() <= ATOL, key
        assert torch.equal(logits.argmax(-1), base.argmax(-1)), key
