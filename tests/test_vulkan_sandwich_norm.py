"""Gemma's sandwich norm folded into the o / down mat-vec, finished by each row's last workgroup
(``VulkanBackend.linear_norm_add_rmsnorm``, ``llmopt.backends.vulkan.producer_norm``, ``NORM_OUT = 2`` in
``shaders/matvec_quant.glsl``), on lavapipe with the GPU configuration forced on.

Tolerances (fresh random inputs):
* the new residual r = residual + rmsnorm(d, post), d = int8_chunks(x) W^T, against float64: relative ``RTOL`` = 2e-5;
* the x8 rows against a torch quantization of ``r * (w + offset)`` (r: the device's): codes within 1, at most 1% off
  by one, scales within 1e-6 relative, code sums exact; the one partial a row within 1e-5 of ``sum(r^2)``;
* each fold in its own layout (``sandwich_layout``, ``norm_layout``), a bad one named by its field;
* a reader (an int4 mat-vec applying 1 / rms) against float64: ``RTOL``; the floats made on demand equal the
  ``rmsnorm`` of r bit for bit; the arrival counters back to 0 after every call;
* whole tiny Gemma 2 / Gemma 3 int4 models: every o and down projection folded (but the last down: no next norm),
  replayed logits equal eager ones bit for bit, within ``RTOL_X8`` = 2e-2 of the unfolded path and within
  ``MODEL_RTOL`` = 6e-2 of the CPU backend (as test_vulkan_producer_norm); chained (the GPU's decode_chain forced
  on) bit for bit the barrier path, greedy tokens with two steps in flight equal;
* a chained step that times out raises, and leaves every arrival counter at 0 (reset by the host);
* one greedy run under the Khronos validation layer with synchronization validation: no message.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llmopt.backends.cpu import CpuBackend
from llmopt.engine import load_model
from llmopt.errors import LlmoptError
from llmopt.quant.quantizers import Spec

from vulkan_device import (GPU_CONFIG, folded_greedy_script, no_subgroup_backend, require_vulkan,
                           run_under_validation_layer)
vulkan = require_vulkan("integer_dot_product")
from llmopt.backends.vulkan.backend import MATVEC_MAX_M, int8_chunks  # noqa: E402
from llmopt.backends.vulkan.replay import VulkanDecoder  # noqa: E402
from test_vulkan_chain import unreachable_ticket  # noqa: E402
from test_vulkan_ops import rel_err  # noqa: E402
from test_vulkan_producer_norm import check_folded_x8, record_folds, weight  # noqa: E402
from tiny_models import COMMON, FAMILIES, pack_folder, save_random  # noqa: E402

pytestmark = pytest.mark.vulkan

RTOL, RTOL_X8, MODEL_RTOL, EPS = 2e-5, 2e-2, 6e-2, 1e-6


@pytest.fixture
def fast(be, monkeypatch):
    for key in GPU_CONFIG:
        monkeypatch.setattr(be, key, True)
    return be


def arrivals(be) -> np.ndarray:
    return be.dev.download(be._arrivals, 4 * MATVEC_MAX_M, np.uint32)


def sandwich_case(be, gen, f, k, m) -> tuple:
    """Random inputs of one sandwich fold: the o weight (packed, and float64), x, the residual, post and next gains."""
    wo, wo64, _ = weight(be, "o_proj", gen, f, k)
    x, res = torch.randn(1, m, k, generator=gen), torch.randn(1, m, f, generator=gen)
    return wo, wo64, x, res, torch.randn(f, generator=gen), torch.randn(f, generator=gen)


def check_folded(be, gen, r, normed, x, wo64, res, post, g, unit_offset, case) -> None:
    """A sandwich fold's outputs against float64: r, the x8 rows of r * (g + offset), the one partial sum of r^2 a
    row, and an int4 reader of them."""
    rh = be.to_host(r)
    d = int8_chunks(x) @ wo64.T
    gain = post.double() + (1.0 if unit_offset else 0.0)
    want = res.double() + d * (d.pow(2).mean(-1, keepdim=True) + EPS).rsqrt() * gain
    assert rel_err(rh, want) < RTOL, case
    check_folded_x8(be, gen, normed, rh, g, unit_offset, case)


def check_sandwich(be, gen, f, k, m, unit_offset, case):
    """One folded sandwich norm (f outputs over k inputs, m rows) and a reader, against float64."""
    wo, wo64, x, res, post, g = sandwich_case(be, gen, f, k, m)
    r, normed = be.linear_norm_add_rmsnorm(be.from_host(x), wo, be.from_host(res), be.param("post", post),
                                           be.param("norm", g), EPS, unit_offset)
    assert normed.rms is not None and normed.rms.n_parts == 1 and normed._buf is None, case  # folded
    check_folded(be, gen, r, normed, x, wo64, res, post, g, unit_offset, case)
    assert not arrivals(be).any(), case
    floats = be.to_host(normed)  # made on demand: the rmsnorm of r
    assert torch.equal(floats, be.to_host(be.rmsnorm(r, be.param("norm", g), EPS, unit_offset))), case


# rows of 2 to 11 workgroups of 32 outputs (lavapipe's default 8 sets of 4; one set of 32 rows; sets of 2 invocations,
# narrower than lavapipe's subgroups; 8 sets of 128 invocations; the GPU's 4 sets of 128 with 8 rows, v23) and one of
# 64 outputs a workgroup (f = 160: a last workgroup of one chunk); 1, 3 and 8 input rows (a counter each)
@pytest.mark.parametrize("layout", [(64, 8, 4), (32, 0, 32), (32, 2, 2), (1024, 128, 4), (512, 128, 8), (64, 8, 8)])
@pytest.mark.parametrize("unit_offset", [False, True])
def test_sandwich_against_reference(fast, gen, monkeypatch, layout, unit_offset):
    monkeypatch.setattr(fast, "sandwich_layout", layout)
    for f, k, m in [(96, 64, 1), (160, 288, 3), (352, 96, 2), (64, 96, MATVEC_MAX_M)]:
        check_sandwich(fast, gen, f, k, m, unit_offset, (layout, unit_offset, f, k, m))


def test_each_fold_takes_its_own_layout(fast, gen, monkeypatch):
    """The sandwich fold is laid out by ``sandwich_layout`` and the plain fold by ``norm_layout`` (v23: the GPU's
    differ): each runs right with the other's layout unusable, and a bad layout is named by its own field."""
    be = fast
    bad = (64, 8, 2)  # 16 outputs a workgroup: not whole 32-value chunks
    monkeypatch.setattr(be, "norm_layout", bad)
    monkeypatch.setattr(be, "sandwich_layout", (512, 128, 8))  # the GPU's
    check_sandwich(be, gen, 160, 96, 3, True, "sandwich_layout (512, 128, 8), norm_layout bad")
    wo, _, _ = weight(be, "o_proj", gen, 64, 64)
    x, res, g = (be.from_host(torch.randn(1, 1, 64, generator=gen)), be.from_host(torch.randn(1, 1, 64, generator=gen)),
                 be.param("norm", torch.ones(64)))
    with pytest.raises(LlmoptError, match=r"norm_layout \(64, 8, 2\): expected .*multiple of 32"):
        be.linear_add_rmsnorm(x, wo, res, g, EPS, False)
    monkeypatch.setattr(be, "norm_layout", (64, 8, 4))
    monkeypatch.setattr(be, "sandwich_layout", bad)
    with pytest.raises(LlmoptError, match=r"sandwich_layout \(64, 8, 2\): expected .*multiple of 32"):
        be.linear_norm_add_rmsnorm(x, wo, res, be.param("post", torch.ones(64)), g, EPS, True)
    total, normed = be.linear_add_rmsnorm(x, wo, res, g, EPS, False)
    assert normed.rms is not None and normed.rms.n_parts == 2  # folded, 32 outputs a workgroup in (64, 8, 4)


def test_sandwich_without_subgroups(gen, tmp_path):
    """The build for devices without subgroup arithmetic (every sum through shared memory): the same checks."""
    be = no_subgroup_backend(tmp_path)
    try:
        for key in GPU_CONFIG:
            setattr(be, key, True)
        for layout in ((64, 8, 4), (32, 0, 32)):
            be.sandwich_layout = layout
            check_sandwich(be, gen, 160, 96, 3, True, layout)
    finally:
        be.close()


def test_no_fold_where_it_cannot_apply(fast, gen, monkeypatch):
    """linear then norm_add_rmsnorm (bit for bit) where the fold does not apply; bad inputs named."""
    be = fast
    x, res = torch.randn(1, 1, 64, generator=gen), torch.randn(1, 1, 96, generator=gen)
    post, g = be.param("post", torch.randn(96, generator=gen)), be.param("norm", torch.randn(96, generator=gen))
    wo, _, _ = weight(be, "o_proj", gen, 96, 64)

    def check(w, xs, rs, folded, why):
        r, normed = be.linear_norm_add_rmsnorm(be.from_host(xs), w, be.from_host(rs), post, g, EPS, True)
        assert (normed.rms is not None) == folded, why
        if not folded:
            want_r, want_n = be.norm_add_rmsnorm(be.from_host(rs), be.linear(be.from_host(xs), w), post, g, EPS, True)
            assert torch.equal(be.to_host(r), be.to_host(want_r)), why
            assert torch.equal(be.to_host(normed), be.to_host(want_n)), why

    check(wo, x, res, True, "int4, 96 outputs")
    check(weight(be, "o_proj", gen, 96, 64, bits=8)[0], x, res, False, "int8 producer")
    check(weight(be, "o_proj", gen, 40, 64)[0], x, res[..., :40], False, "40 outputs: not whole chunks")
    prefill = torch.randn(1, MATVEC_MAX_M + 1, 64, generator=gen)
    check(wo, prefill, torch.randn(1, MATVEC_MAX_M + 1, 96, generator=gen), False, "prefill rows")
    monkeypatch.setattr(be, "sandwich_tail_max", 1)  # 96 values over lavapipe's 64 invocations: 2 an invocation
    check(wo, x, res, False, "row longer than the tail's registers")
    monkeypatch.setattr(be, "sandwich_tail_max", 16)
    for key in ("fuse_sandwich_norm", "matvec_x_q8", "matvec_int_dot"):
        monkeypatch.setattr(be, key, False)
        check(wo, x, res, False, f"{key} off")
        monkeypatch.setattr(be, key, True)
    with pytest.raises(LlmoptError, match="linear_norm_add_rmsnorm o_proj: input has 96 features, weight expects 64"):
        be.linear_norm_add_rmsnorm(be.from_host(res), wo, be.from_host(res), post, g, EPS, True)
    with pytest.raises(LlmoptError, match="linear_norm_add_rmsnorm: the norm weight holds 8 values, 96 features"):
        be.linear_norm_add_rmsnorm(be.from_host(x), wo, be.from_host(res), be.param("short", torch.ones(8)), g,
                                   EPS, True)


def gemma_model(be, tmp_path, family):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    folder = pack_folder(save_random(FAMILIES[family](), tmp_path / "f", seed), tmp_path / "q",
                         [Spec(4, 32, sym=False)])
    return folder, load_model(folder, backend=be), f"{family} seed={seed}"


def decode(model, ids):
    logits, state = model.prefill(ids[:, :4], max_len=ids.shape[1] + 1)
    return torch.stack([logits, *[model.decode_step(state, ids[:, t]) for t in range(4, ids.shape[1])]]), state


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_tiny_gemma_fold(be, tmp_path, monkeypatch, family):
    """Whole int4 Gemma models: every o and down projection but the last down folds its sandwich norm; replayed =
    eager bit for bit, chained = barriers bit for bit; close to the unfolded path and the CPU backend; greedy
    tokens with two steps in flight equal to eager ones."""
    folder, model, name = gemma_model(be, tmp_path, family)
    for key in GPU_CONFIG:
        monkeypatch.setattr(be, key, True)
    monkeypatch.setattr(be, "chain_early", 1)
    folds = record_folds(monkeypatch, be, "linear_norm_add_rmsnorm")
    ids = torch.randint(0, COMMON["vocab_size"], (1, 10))
    layers, runs = model.args.n_layers, {}
    for on, replay, chain in [(False, False, "off"), (True, False, "off"), (True, True, "off"), (True, True, "chain")]:
        monkeypatch.setattr(be, "fuse_sandwich_norm", on)
        monkeypatch.setattr(be, "decode_chain", chain)
        folds.clear()
        model.static_decode = replay
        runs[on, replay, chain], state = decode(model, ids)
        assert state.decode_path == ("replayed" if replay else "eager: Model.static_decode is off")
        # prefill (4 rows: mat-vecs) and each eager step: 2 * layers - 1 calls (the last down has no next norm)
        assert len(folds) >= 2 * (2 * layers - 1) and all(f == on for f in folds), (on, replay, folds)
        assert not arrivals(be).any(), name
    assert torch.equal(runs[True, True, "off"], runs[True, False, "off"]), f"{name}: replayed differs from eager"
    assert torch.equal(runs[True, True, "chain"], runs[True, True, "off"]), f"{name}: chained differs from barriers"
    assert rel_err(runs[True, False, "off"], runs[False, False, "off"]) < RTOL_X8, name
    cpu = load_model(folder, backend=CpuBackend())
    ref, _ = decode(cpu, ids)
    assert rel_err(runs[True, True, "off"], ref) < MODEL_RTOL, name
    tokens = {}
    for chain in ("off", "chain"):  # greedy, replayed, two steps in flight, left padding
        monkeypatch.setattr(be, "decode_chain", chain)
        model.static_decode = True
        gen = model.generate([[5, 6, 7], [8, 9]], max_new_tokens=6, stop_ids=[])
        assert gen.timings["decode_path"] == "replayed", gen.timings["decode_path"]
        tokens[chain] = gen.tokens
    model.static_decode = False
    eager = model.generate([[5, 6, 7], [8, 9]], max_new_tokens=6, stop_ids=[]).tokens
    assert tokens["off"] == eager and tokens["chain"] == eager, (name, tokens, eager)


def test_timed_out_step_resets_arrivals(be, tmp_path, monkeypatch):
    """A chained step that times out (the first sandwich mat-vec's ticket unreachable: its workgroups skip their work
    and never count in) raises, and the arrival counters are zero afterwards, even if some workgroups had counted in
    (here: a counter set to 5 by hand before the step)."""
    _, model, name = gemma_model(be, tmp_path, "gemma2")
    for key in GPU_CONFIG:
        monkeypatch.setattr(be, key, True)
    monkeypatch.setattr(be, "decode_chain", "chain")
    hit = unreachable_ticket(monkeypatch, lambda chain, pipe, label: bool(label) and label.endswith(" o"))
    ids = torch.randint(0, COMMON["vocab_size"], (1, 5))
    logits, state = model.prefill(ids[:, :4], max_len=8)
    dec = VulkanDecoder(model, state)
    try:
        assert len(hit) == 1, hit
        be.dev.upload(be._arrivals, np.array([5] + [0] * (MATVEC_MAX_M - 1), np.uint32))
        with pytest.raises(LlmoptError, match=rf"chained dispatches timed out: dispatch {hit[0]} \(.* o\)"):
            dec.step(state, ids[:, 4])
        assert not arrivals(be).any(), name
    finally:
        dec.close()


SANDWICH_RUN = folded_greedy_script("gemma2", "linear_norm_add_rmsnorm")


def test_sandwich_runs_clean_under_validation_layer(tmp_path):
    """Greedy decoding of a batch of two (left-padded) with the sandwich fold on, two replayed steps in flight,
    under the Khronos validation layer with synchronization validation: no message."""
    run_under_validation_layer(SANDWICH_RUN, str(tmp_path), str(Path(__file__).parent))
