"""Gemma's sandwich norm folded into the o / down mat-vec in its grid form: every workgroup stores its partial sum of
d^2 into a tagged slot, waits until the row's other slots show this dispatch's tag, and finishes its own outputs
(``NORM_OUT = 3`` in ``shaders/matvec_quant.glsl``, ``sandwich_grid``; taken by
``VulkanBackend.linear_norm_add_rmsnorm`` in a chained recording where the row's workgroups are at most
``sandwich_grid_max``, the device's SMs), on lavapipe with the GPU configuration forced on.

What lavapipe can and cannot show: it reports no SM count (``sandwich_grid_max`` = 0, so the form is never taken
there by default), and it may run a dispatch's workgroups one after another, where a wait for a later workgroup
cannot end. So the results are checked with rows of ONE workgroup (the wait passes at once; every other step of the
form runs: the tag read from the workgroup's own slot and flipped, the tagged store and the poll, the sum of the
partials, the per-workgroup outputs, x8 rows and partials of r^2), and rows of several workgroups for the time-out
path (the bounded poll ends, the chain's error word names the dispatch, the host raises and zeroes the slots; where
lavapipe's threads happen to run a row's two workgroups side by side, the step must instead be right). That a row's
112 workgroups meet at the wait and go on is shown on the GPU only (bench/vulkan_decode.py: replayed vs eager
logits and tokens, docs/benchmarks.md v22).

Tolerances (fresh random inputs), as tests/test_vulkan_sandwich_norm.py: r against float64 within ``RTOL`` = 2e-5;
x8 codes of r * (w + offset) within 1, at most 1% off by one; the partials' sum within 1e-5 of sum(r^2); an int4
reader within ``RTOL``; after every call the tail's counters 0, every row's grid slots one tag (flipped by each
call) and the chain's counter at its workgroups; whole tiny Gemma 2 / Gemma 3 models (hidden 64, one workgroup of
64 outputs): every o and down of the chained replayed body in the grid form, its logits within ``RTOL_MODEL`` = 1e-4
of the barrier path's (the last-workgroup tail: the same math, its sums in another order and the partials' lowest
mantissa bit a tag), greedy tokens with two steps in flight equal to eager ones.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from llmopt.errors import LlmoptError

from vulkan_device import GPU_CONFIG, require_vulkan, run_under_validation_layer, tiny_int4_script
vulkan = require_vulkan("integer_dot_product")
from llmopt.backends.vulkan import chain as vk_chain  # noqa: E402
from llmopt.backends.vulkan.backend import MATVEC_MAX_M  # noqa: E402
from llmopt.backends.vulkan.producer_norm import GRID_GROUPS  # noqa: E402
from llmopt.backends.vulkan.replay import VulkanDecoder  # noqa: E402
from test_vulkan_ops import rel_err  # noqa: E402
from test_vulkan_producer_norm import weight  # noqa: E402
from test_vulkan_sandwich_norm import EPS, check_folded, decode, gemma_model, sandwich_case  # noqa: E402
from tiny_models import COMMON  # noqa: E402

pytestmark = pytest.mark.vulkan

RTOL_MODEL = 1e-4
GRID_TIMED_OUT = r"chained dispatches timed out: dispatch \d+ \(matvec_quant_idot (o|down)\) "


@pytest.fixture
def grid(be, monkeypatch):
    for key in GPU_CONFIG:
        monkeypatch.setattr(be, key, True)
    monkeypatch.setattr(be, "sandwich_grid_max", 1 << 20)  # every row "resident": lavapipe reports no SMs
    return be


def counters(be) -> np.ndarray:
    """The tail's arrival counters (0 between dispatches) and, per workgroup count g and input row, whether the
    grid's slots of that row hold more than one tag (never between dispatches): all zeros when sane."""
    slots = be.dev.download(be._grid_slots, be._grid_slots.nbytes, np.uint32) & 1
    split = [np.ptp(slots[MATVEC_MAX_M * g * (g - 1) // 2:][:MATVEC_MAX_M * g].reshape(MATVEC_MAX_M, g), axis=1)
             for g in range(1, GRID_GROUPS + 1)]
    return np.concatenate([be.dev.download(be._arrivals, 4 * MATVEC_MAX_M, np.uint32), *split])


def tags(be, groups: int, m: int) -> np.ndarray:
    """The tag of each of the first m rows' slots for dispatches of ``groups`` workgroups (one a row when sane)."""
    slots = be.dev.download(be._grid_slots, be._grid_slots.nbytes, np.uint32) & 1
    region = slots[MATVEC_MAX_M * groups * (groups - 1) // 2:][:MATVEC_MAX_M * groups]
    return region.reshape(MATVEC_MAX_M, groups)[:m, 0]


def chained_call(be, fn):
    """``fn()`` recorded under a chain (as a replayed step's body is); returns its result and the chain, whose
    counter and error word were read back after it."""
    chain = vk_chain.Chain(be.dev, "chain")
    chain.record_reset()
    be.dev.chain = chain
    try:
        out = fn()
    finally:
        be.dev.chain = None
    host = be.dev.buffer(16, host=True, name="chain readback")
    chain.record_readback(host)
    be.dev.flush()
    return out, chain, host


def test_grid_against_reference(grid, gen, monkeypatch):
    """Rows of one workgroup (32 or 64 outputs; 1 to 8 input rows, a counter each), both gain styles, against float64;
    the chain's counter ends at its workgroups, no error, every counter back to 0."""
    be = grid
    for layout, f in [((64, 8, 8), 64), ((32, 0, 32), 32), ((1024, 128, 4), 32), ((512, 128, 8), 32), ((64, 8, 4), 32)]:
        monkeypatch.setattr(be, "sandwich_layout", layout)
        for k, m, unit_offset in [(64, 1, True), (288, 3, False), (96, MATVEC_MAX_M, True)]:
            case = (layout, f, k, m, unit_offset)
            wo, wo64, x, res, post, g = sandwich_case(be, gen, f, k, m)
            before = tags(be, 1, m)
            (r, normed), chain, host = chained_call(be, lambda: be.linear_norm_add_rmsnorm(
                be.from_host(x), wo, be.from_host(res), be.param("post", post), be.param("norm", g), EPS,
                unit_offset))
            chain.check(host)
            assert [link.groups for link in chain.links] == [m], case  # one chained dispatch: m rows of 1
            assert normed.rms is not None and normed.rms.n_parts == 1, case
            check_folded(be, gen, r, normed, x, wo64, res, post, g, unit_offset, case)
            assert not counters(be).any() and np.array_equal(tags(be, 1, m), before ^ 1), case  # each row flipped


def test_grid_taken_only_where_resident_and_chained(grid, gen, monkeypatch):
    """The grid form needs a chained recording (its time-out reported by the chain) and at most
    ``sandwich_grid_max`` workgroups; otherwise the last workgroup's tail (one partial a row)."""
    be = grid
    monkeypatch.setattr(be, "sandwich_layout", (64, 8, 4))  # 32 outputs a workgroup: 3 for 96
    wo, _, _ = weight(be, "o_proj", gen, 96, 64)
    x, res = be.from_host(torch.randn(1, 1, 64, generator=gen)), be.from_host(torch.randn(1, 1, 96, generator=gen))
    post, g = be.param("post", torch.randn(96, generator=gen)), be.param("norm", torch.randn(96, generator=gen))

    def parts(chained: bool) -> int:
        call = lambda: be.linear_norm_add_rmsnorm(x, wo, res, post, g, EPS, True)[1]  # noqa: E731
        if not chained:
            return call().rms.n_parts
        with monkeypatch.context() as mp:  # recorded with the chain's choices, run unchained: nothing waits for it
            mp.setattr(vk_chain.Chain, "variant", lambda self, *a: None)
            return chained_call(be, call)[0].rms.n_parts

    assert be.dev.info["sm_count"] == 0  # lavapipe reports no SMs: the grid fixture forced sandwich_grid_max
    shader = (Path(__file__).parents[1] / "shaders" / "matvec_quant.glsl").read_text()
    assert f"#define GRID_ROWS {MATVEC_MAX_M}u" in shader  # the slots' regions, laid out alike on both sides
    assert GRID_GROUPS * MATVEC_MAX_M <= vk_chain.MAX_GROUPS  # a grid dispatch is always recorded chained
    assert parts(chained=False) == 1  # eager, on barriers: the tail
    monkeypatch.setattr(be, "sandwich_grid_max", 3)
    assert parts(chained=True) == 3  # 3 workgroups, 3 resident
    monkeypatch.setattr(be, "sandwich_grid_max", 2)
    assert parts(chained=True) == 1
    be.reset_arrivals()  # the 3-workgroup grid dispatch above ran unchained on lavapipe: its waits gave up
    monkeypatch.setattr(be, "sandwich_grid_max", 1 << 20)
    monkeypatch.setattr(be, "sandwich_layout", (32, 0, 32))  # 32 invocations poll the slots: rows of 32 at most
    be.dev.chain = vk_chain.Chain(be.dev, "chain")
    try:
        assert be._sandwich_grid(32 * 32) and not be._sandwich_grid(33 * 32)
    finally:
        be.dev.chain.free()
        be.dev.chain = None


def test_grid_wait_times_out_and_raises(grid, gen, monkeypatch):
    """Rows of 11 workgroups on lavapipe, which may not run them side by side: each wait that cannot end gives up
    after its bounded poll, the chain's error word names the dispatch, and the decoder zeroes the counters."""
    be = grid
    monkeypatch.setattr(be, "sandwich_layout", (64, 8, 4))
    wo, _, _ = weight(be, "o_proj", gen, 352, 96)
    x, res = torch.randn(1, 1, 96, generator=gen), torch.randn(1, 1, 352, generator=gen)
    post, g = be.param("post", torch.randn(352, generator=gen)), be.param("norm", torch.randn(352, generator=gen))
    _, chain, host = chained_call(be, lambda: be.linear_norm_add_rmsnorm(be.from_host(x), wo, be.from_host(res),
                                                                         post, g, EPS, True))
    count, error = (int(v) for v in host.view(np.uint32, 2))
    if error == 0:  # this lavapipe ran all 11 side by side: then the row must be right and the counters 0
        assert count == chain.count and not counters(be).any()
        pytest.skip("lavapipe ran the row's 11 workgroups at once: no time-out to observe")
    with pytest.raises(LlmoptError, match=r"chained dispatches timed out: dispatch 0 \(matvec_quant_idot o\)"):
        chain.check(host)
    be.reset_arrivals()
    assert not counters(be).any()


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_tiny_gemma_grid(be, tmp_path, monkeypatch, family):
    """Whole int4 Gemma models (hidden 64: one workgroup of 64 outputs a row): chained, every o and down takes the
    grid form; replayed logits close to the barrier path's (the tail), the counters and slots sane after each run;
    greedy tokens with two steps in flight equal to eager ones; rows of two workgroups: a step right or timed out, and
    a step over slots whose tags disagree times out, names a grid mat-vec, and leaves the slots zeroed."""
    _, model, name = gemma_model(be, tmp_path, family)
    for key in GPU_CONFIG:
        monkeypatch.setattr(be, key, True)
    monkeypatch.setattr(be, "sandwich_layout", (64, 8, 8))
    monkeypatch.setattr(be, "sandwich_grid_max", 1)
    forms = []
    fold = be.linear_norm_add_rmsnorm

    def counted(*args):
        out = fold(*args)
        forms.append(be._sandwich_grid(out[0].features) and out[1].rms is not None)
        return out

    monkeypatch.setattr(be, "linear_norm_add_rmsnorm", counted)
    model.static_decode = True
    ids = torch.randint(0, COMMON["vocab_size"], (1, 8))
    runs = {}
    for chain in ("off", "chain"):
        monkeypatch.setattr(be, "decode_chain", chain)
        forms.clear()
        runs[chain], state = decode(model, ids)
        assert state.decode_path == "replayed"
        assert forms and any(forms) == (chain == "chain"), (chain, forms)  # the replayed body's calls: the grid
        assert not counters(be).any(), name
    assert rel_err(runs["chain"], runs["off"]) < RTOL_MODEL, name
    gen = model.generate([[5, 6, 7], [8, 9]], max_new_tokens=6, stop_ids=[])  # chained, two steps in flight
    assert gen.timings["decode_path"] == "replayed", gen.timings["decode_path"]
    model.static_decode = False
    assert gen.tokens == model.generate([[5, 6, 7], [8, 9]], max_new_tokens=6, stop_ids=[]).tokens, name
    assert not counters(be).any(), name

    # rows of 2 workgroups: lavapipe runs them side by side or one after the other (its threads); where a wait
    # cannot end, the step raises naming a grid mat-vec and the counters are 0; where none timed out, it is right
    monkeypatch.setattr(be, "sandwich_layout", (64, 8, 4))
    monkeypatch.setattr(be, "sandwich_grid_max", 2)
    model.static_decode = True
    _, state = model.prefill(ids[:, :4], max_len=8)
    dec = VulkanDecoder(model, state)
    try:
        try:
            out = dec.step(state, ids[:, 4])
        except LlmoptError as e:
            assert re.match(GRID_TIMED_OUT, str(e)), str(e)
        else:
            assert rel_err(out.reshape(-1), runs["off"][1].reshape(-1)) < RTOL_MODEL, name  # the step after prefill
        assert not counters(be).any(), name
        # row 0's two slots set to different tags by hand (as a step that timed out in the chain's wait leaves them
        # where some workgroups skipped): the two wait for different tags, one times out, the host zeroes the slots
        split = np.zeros(be._grid_slots.nbytes // 4, np.uint32)
        split[MATVEC_MAX_M * 2 * 1 // 2 + 1] = 1
        be.dev.upload(be._grid_slots, split)
        with pytest.raises(LlmoptError, match=GRID_TIMED_OUT):
            dec.step(state, ids[:, 4])
        assert not counters(be).any(), name
    finally:
        dec.close()


GRID_RUN = tiny_int4_script("gemma2") + r'''
be.sandwich_layout, be.sandwich_grid_max, be.decode_chain = (64, 8, 8), 1, "chain"
model = load_model(folder, backend=be)
grids = []
fold = be.linear_norm_add_rmsnorm
be.linear_norm_add_rmsnorm = lambda *a: (lambda out: grids.append(be._sandwich_grid(64)) or out)(fold(*a))
gen = model.generate([[5, 6, 7], [8, 9]], max_new_tokens=6, stop_ids=[])  # left padding, two steps in flight
assert gen.timings["decode_path"] == "replayed", gen.timings["decode_path"]
assert any(grids), grids
be.close()
print("done")
'''


def test_grid_runs_clean_under_validation_layer(tmp_path):
    """Greedy decoding of a batch of two, chained, every replayed o and down in the grid form, under the Khronos
    validation layer (without synchronization validation: chained dispatches order themselves through memory, which
    it cannot see): no message."""
    run_under_validation_layer(GRID_RUN, str(tmp_path), str(Path(__file__).parent), sync=False)
