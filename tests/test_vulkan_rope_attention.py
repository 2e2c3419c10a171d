"""The fused decode attention (``rope_attention.comp``: RoPE, KV store and attention in one dispatch) against the
CPU reference backend's rope + attention, on fresh random inputs (lavapipe in CI).

Each case prefills (the unfused path: rope, rope, attention) and then decodes several steps through
``VulkanBackend.rope_attention``, comparing every step's output with ``CpuBackend(quant="reference")`` fed the
same inputs; later steps read the slots the fused dispatch stored, so its KV store is checked too. Head sizes and
group sizes are odd where the shader allows, the KV length is split into many chunks (the cross-workgroup combine)
and into one. Tolerance: relative error below 1e-5 (float32 over a few dozen slots). The phase-clock build
(``attn_clock``, ``rope_attention_clock.comp``) is checked the same way, and its records for consistency (skipped
where the device lacks VK_KHR_shader_clock; lavapipe has it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llmopt.backends.base import AttnSpec

from vulkan_device import require_vulkan, run_under_validation_layer
vulkan = require_vulkan()
pytestmark = pytest.mark.vulkan

from llmopt.errors import LlmoptError  # noqa: E402
from test_vulkan_ops import rel_err  # noqa: E402

RTOL = 1e-5


def tables(batch: int, T: int, head_dim: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    ang = torch.rand(batch, T, head_dim // 2, generator=gen) * 20
    ang = torch.cat([ang, ang], -1)  # any table works; the model's RoPE kinds differ only in how it is built
    return ang.cos(), ang.sin()


def run_case(be, cpu, gen, spec: AttnSpec, prompt: int, decode: int, batch: int = 1, pad=None,
             chunk_min: int = 64, split_target: int = 1, wg: int | None = None) -> int:
    """Prefill ``prompt`` tokens, then ``decode`` fused steps; returns how many steps ran fused."""
    max_len = prompt + decode + 2
    cv = be.kv_cache(1, batch, max_len, spec.n_kv_heads, spec.head_dim, [spec.window])
    cc = cpu.kv_cache(1, batch, max_len, spec.n_kv_heads, spec.head_dim, [spec.window])
    valid = torch.ones(batch, max_len, dtype=torch.bool)
    for b, p in enumerate(pad or []):
        valid[b, :p] = False
    saved = be.attn_chunk_min, be.attn_split_target, be.attn_wg
    be.attn_chunk_min, be.attn_split_target, be.attn_wg = chunk_min, split_target, wg or be.attn_wg
    fused, start = 0, 0
    try:
        for T in [prompt] + [1] * decode:
            q = torch.randn(batch, T, spec.n_heads * spec.head_dim, generator=gen)
            k = torch.randn(batch, T, spec.n_kv_heads * spec.head_dim, generator=gen)
            v = torch.randn(batch, T, spec.n_kv_heads * spec.head_dim, generator=gen)
            cos, sin = tables(batch, T, spec.head_dim, gen)
            mask = valid[:, :start + T] if pad else None
            fused += T == 1 and be._fusable(be.from_host(q), spec, cv)
            out = be.to_host(be.rope_attention(be.from_host(q), be.from_host(k), be.from_host(v), cos, sin,
                                               spec.head_dim, cv, 0, start, mask, spec))
            qr, kr = cpu.rope(q, cos, sin, spec.head_dim), cpu.rope(k, cos, sin, spec.head_dim)
            ref = cpu.attention(qr, kr, v, cc, 0, start, mask, spec)
            assert rel_err(out, ref) < RTOL, (spec, T, start)
            start += T
    finally:
        be.attn_chunk_min, be.attn_split_target, be.attn_wg = saved
    return fused


@pytest.mark.parametrize("spec", [
    AttnSpec(7, 1, 24, 24 ** -0.5),                            # Qwen2.5-7B's group of 7, an odd head size
    AttnSpec(4, 4, 16, 0.25),                                  # plain multi-head
    AttnSpec(4, 2, 256, 256 ** -0.5, window=5, softcap=50.0),  # Gemma 2: head 256, window, softcap
    AttnSpec(10, 2, 40, 0.1),                                  # group of 5 (Qwen2.5-14B/32B), head not a power of 2
])
@pytest.mark.parametrize("chunk_min, split_target, wg", [(64, 1, None), (2, 64, None), (3, 64, 64)])
def test_decode_matches_reference(be, cpu, gen, spec, chunk_min, split_target, wg):
    """One split (its value loop past a block of 16 slots); up to 22 splits combined (past a block of 16 partials);
    a wider workgroup than the device's default."""
    assert run_case(be, cpu, gen, spec, prompt=37, decode=5, batch=2, chunk_min=chunk_min,
                    split_target=split_target, wg=wg) == 5


@pytest.mark.parametrize("chunk_min, split_target", [(64, 1), (2, 64)])
def test_left_padding_batch(be, cpu, gen, chunk_min, split_target):
    """Padded slots are masked; a split whose slots are all padding contributes nothing."""
    spec = AttnSpec(6, 2, 32, 32 ** -0.5, softcap=20.0)
    assert run_case(be, cpu, gen, spec, prompt=8, decode=3, batch=3, pad=[0, 3, 7], chunk_min=chunk_min,
                    split_target=split_target) == 3


def test_window_with_splits(be, cpu, gen):
    spec = AttnSpec(4, 2, 16, 0.25, window=6)
    assert run_case(be, cpu, gen, spec, prompt=11, decode=4, batch=1, chunk_min=2, split_target=16) == 4


def test_long_context_needs_many_chunks(be, cpu, gen):
    """A cache longer than one chunk's 256 slots: splits are forced even at a split target of 1."""
    spec = AttnSpec(2, 1, 16, 0.25)
    assert run_case(be, cpu, gen, spec, prompt=300, decode=2, batch=1) == 2
    assert be._splits(spec, be.kv_cache(1, 1, 304, 1, 16, [None]), 1) == 2


def test_unfusable_shapes_take_the_separate_path(be, cpu, gen):
    """A group of 9 query heads exceeds the shader's 8: rope + attention, still correct."""
    assert run_case(be, cpu, gen, AttnSpec(9, 1, 16, 0.25), prompt=5, decode=2) == 0
    be.fuse_rope_attention = False
    try:
        assert run_case(be, cpu, gen, AttnSpec(4, 2, 16, 0.25), prompt=5, decode=2) == 0
    finally:
        be.fuse_rope_attention = True


def test_bad_input(be, gen):
    spec = AttnSpec(4, 2, 16, 0.25)
    cache = be.kv_cache(1, 1, 4, 2, 16, [None])
    q, kv = be.from_host(torch.randn(1, 1, 64)), be.from_host(torch.randn(1, 1, 32))
    cos, sin = tables(1, 1, 16, gen)
    with pytest.raises(LlmoptError, match="exceeds the KV cache of 4"):
        be.rope_attention(q, kv, kv, cos, sin, 16, cache, 0, 4, None, spec)
    with pytest.raises(LlmoptError, match="do not fit q"):
        be.rope_attention(q, kv, kv, cos[..., :8], sin[..., :8], 16, cache, 0, 0, None, spec)
    with pytest.raises(LlmoptError, match="do not match"):
        be.rope_attention(q, q, kv, cos, sin, 16, cache, 0, 0, None, spec)
    be.attn_chunk_min = 0
    try:
        with pytest.raises(LlmoptError, match="attn_chunk_min 0"):
            be.rope_attention(q, kv, kv, cos, sin, 16, cache, 0, 0, None, spec)
    finally:
        be.attn_chunk_min = 64


def _model(tmp_path, family: str):
    from test_vulkan_models import FAMILIES, save_random

    from llmopt.engine import load_model

    return load_model(save_random(FAMILIES[family](), tmp_path, int(torch.randint(0, 2**31 - 1, ()))),
                      backend=vulkan.VulkanBackend())


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_whole_model_fused_and_split_matches_unfused(tmp_path, family):
    """Whole-model decode logits, left-padded batch of 2: unfused and fused, eager and replayed (many splits, so the
    replayed step's combine and step-buffer slot/positions run) agree within the model tests' 1e-4."""
    from test_vulkan_models import ATOL, COMMON

    model = _model(tmp_path, family)
    be = model.backends["vulkan"]
    be.attn_chunk_min, be.attn_split_target = 2, 64
    ids = torch.randint(0, COMMON["vocab_size"], (2, 13))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, :2] = False
    runs = {}
    for label, fused, replay in (("unfused", False, False), ("unfused replayed", False, True), ("fused", True, False),
                                 ("fused replayed", True, True)):
        be.fuse_rope_attention, model.static_decode = fused, replay
        logits, state = model.prefill(ids[:, :5], mask, max_len=ids.shape[1] + 1)
        runs[label] = torch.stack([model.decode_step(state, ids[:, t]) for t in range(5, ids.shape[1])])
        assert state.decode_path == ("replayed" if replay else "eager: Model.static_decode is off")
    for label in ("unfused replayed", "fused", "fused replayed"):
        err = (runs[label] - runs["unfused"]).abs().max().item()
        assert err <= ATOL, f"{family}: {label} vs unfused logits differ by {err:.2e}"
    be.close()


def test_profiled_replay_times_every_dispatch(tmp_path):
    from llmopt.backends.vulkan.replay import VulkanDecoder

    model = _model(tmp_path, "qwen2")
    be, n_layers = model.backends["vulkan"], model.args.n_layers
    ids = torch.randint(0, model.args.vocab_size, (1, 8))
    _, state = model.prefill(ids[:, :4], max_len=10)
    plain = VulkanDecoder(model, state)
    assert plain.body.labels is None
    with pytest.raises(LlmoptError, match="not made with profile=True"):
        plain.kernel_times()
    plain.close()
    dec = VulkanDecoder(model, state, profile=True)
    with pytest.raises(LlmoptError, match="no step has run"):
        dec.replay(1)
    dec.step(state, ids[0, 4:5], greedy=True)
    dec.replay(2)
    times = dec.kernel_times()
    assert times["rope_attention"][1] == 3 * n_layers  # one fused dispatch a layer, three submissions
    assert "rope" not in times and "kv_store" not in times and "attention" not in times
    assert times["argmax"][1] == 3 and times["embedding"][1] == 3
    assert sum(count for _, count in times.values()) == 3 * sum(
        rec.n_commands for rec in (dec.loads[0], dec.body, dec.greedy_tails[0]))
    assert all(ms >= 0 for ms, _ in times.values()) and sum(ms for ms, _ in times.values()) > 0
    assert list(times) == sorted(times, key=lambda k: -times[k][0])
    with pytest.raises(LlmoptError, match="profiled decoder"):
        dec.greedy_steps(state, ids[0, 4:5], 2)
    dec.close()
    be.close()


@pytest.mark.parametrize("prefetch", [False, True])
def test_loads_issued_ahead_or_not(be, cpu, gen, monkeypatch, prefetch):
    """``attn_prefetch`` on (the default) and off: each team's first cached key and each output's first 16 value
    rows loaded before q is roped. Chunks of 16 to 18 slots (a block ahead, then a tail of 0-2), the last split's
    chunk ending in this step's slot (never prefetched: it is stored by this dispatch); head 256 with window and
    softcap in one chunk of 16-19 slots."""
    monkeypatch.setattr(be, "attn_prefetch", prefetch)
    spec = AttnSpec(7, 1, 24, 24 ** -0.5)
    assert run_case(be, cpu, gen, spec, prompt=30, decode=4, batch=2, chunk_min=16, split_target=64) == 4
    spec = AttnSpec(4, 2, 256, 256 ** -0.5, window=20, softcap=50.0)
    assert run_case(be, cpu, gen, spec, prompt=17, decode=3, batch=1, chunk_min=16, split_target=1) == 3


@pytest.mark.parametrize("prompt, chunk_min", [(6, 1), (8, 4), (12, 4)])
def test_chunk_boundaries(be, cpu, gen, prompt, chunk_min):
    """Chunks of one slot (every split a single slot, the last one only this step's, read from shared memory), and
    contexts of 4k + 1 slots over chunks of 4 (the last split again holds only this step's slot) next to 4k + 2..4."""
    spec = AttnSpec(7, 1, 24, 24 ** -0.5)
    assert run_case(be, cpu, gen, spec, prompt=prompt, decode=4, batch=2, chunk_min=chunk_min, split_target=64) == 4


needs_clock = pytest.mark.skipif(not vulkan.probe()["features"].get("shader_clock"),
                                 reason="the device lacks VK_KHR_shader_clock (device and subgroup clocks)")


def check_clock_records(recs: dict, context: int, batch: int, n_kv: int) -> None:
    """What rope_attention_clock's records must say about one dispatch over ``context`` slots: the active splits'
    chunks cover the context, arrivals are a permutation with the last to arrive combining, exactly the highest
    active split holds this step's slot, and each workgroup's stamps never go back in time."""
    from llmopt.backends.vulkan.attention import CLOCK_ACTIVE, CLOCK_COMBINER, CLOCK_LAST, CLOCK_SINGLE
    from llmopt.backends.vulkan.phase_clock import ARRIVED, COMBINED, KEY, ROPE, SCORES, SOFTMAX, START, VALUES

    flags, rt, cy = recs["flags"], recs["realtime_ns"], recs["cycles"]
    assert (rt[:, START] > 0).all()  # every workgroup of the grid, active or not, stamped its first instruction
    for seq in range(batch):
        for head in range(n_kv):
            rows = np.flatnonzero((recs["seq"] == seq) & (recs["kv_head"] == head))
            active = rows[(flags[rows] & CLOCK_ACTIVE) != 0]
            n_active = len(active)
            assert n_active >= 1 and (recs["n_active"][active] == n_active).all()
            assert sorted(recs["split"][active]) == list(range(n_active))
            assert recs["slots"][active].sum() == context
            assert (flags[np.setdiff1d(rows, active)] == 0).all()
            last = active[(flags[active] & CLOCK_LAST) != 0]
            assert list(recs["split"][last]) == [n_active - 1]
            single = n_active == 1
            assert all(bool(f & CLOCK_SINGLE) == single for f in flags[active])
            chain = [START, ROPE, KEY, SCORES, SOFTMAX, VALUES] + ([COMBINED] if single else [ARRIVED])
            for stamps in (rt, cy):
                assert (np.diff(stamps[np.ix_(active, chain)], axis=1) >= 0).all()
            if single:
                assert recs["arrival"][active[0]] == -1
                continue
            assert sorted(recs["arrival"][active]) == list(range(n_active))
            combiner = active[(flags[active] & CLOCK_COMBINER) != 0]
            assert list(recs["arrival"][combiner]) == [n_active - 1]
            i = combiner[0]
            assert rt[i, ARRIVED] <= rt[i, COMBINED - 1] <= rt[i, COMBINED]
            assert rt[i, ARRIVED] >= rt[active, VALUES].max()  # it counted itself after every partial was written


@needs_clock
@pytest.mark.parametrize("chunk_min, split_target, pad, window", [(3, 64, [0, 5], None), (64, 1, None, None),
                                                                   (2, 64, None, 7)])
def test_phase_clock_build(be, cpu, gen, monkeypatch, chunk_min, split_target, pad, window):
    """``attn_clock``: the stamping build computes the same attention (against the CPU reference, many splits over
    a left-padded batch, one split, splits over a sliding window) and its records are consistent
    (check_clock_records); the phase summary is made of non-negative durations."""
    from llmopt.backends.vulkan.phase_clock import format_summary, phase_summary

    monkeypatch.setattr(be, "attn_clock", True)
    spec = AttnSpec(6, 2, 32, 32 ** -0.5, window=window, softcap=20.0)
    prompt, decode, batch = 19, 3, 2
    assert run_case(be, cpu, gen, spec, prompt=prompt, decode=decode, batch=batch, pad=pad, chunk_min=chunk_min,
                    split_target=split_target) == decode
    recs = be.attention_clock()
    assert list(recs) == [0]
    check_clock_records(recs[0], min(prompt + decode, window or prompt + decode), batch, spec.n_kv_heads)
    summary = phase_summary([(recs, None)])
    assert summary["dispatches"] == 1 and summary["timestamps_share_clock"] is None
    assert all(v >= 0 for group in summary["phases_ns"].values() for v in group.values())
    assert ("combiner (last to arrive)" in summary["phases_ns"]) == (split_target > 1)
    assert "| rope q (+ this step's k/v) |" in format_summary(summary)


@needs_clock
def test_phase_clock_replayed_model(tmp_path):
    """The replayed step with ``attn_clock``: the same logits as without (the model tests' 1e-4), a record set for
    every layer, and the profiled step's timestamps bracketing each dispatch for the summary."""
    from test_vulkan_models import ATOL

    from llmopt.backends.vulkan.phase_clock import dispatch_bounds, phase_summary, recording_stamps_ns
    from llmopt.backends.vulkan.replay import VulkanDecoder

    model = _model(tmp_path, "qwen2")
    be, n_layers = model.backends["vulkan"], model.args.n_layers
    be.attn_chunk_min, be.attn_split_target = 2, 64
    model.static_decode = True
    ids = torch.randint(0, model.args.vocab_size, (1, 12))
    logits = {}
    for clock in (False, True):
        be.attn_clock = clock
        _, state = model.prefill(ids[:, :8], max_len=14)
        logits[clock] = torch.stack([model.decode_step(state, ids[:, t]) for t in range(8, 12)])
    assert (logits[True] - logits[False]).abs().max().item() <= ATOL
    recs = be.attention_clock()
    assert sorted(recs) == list(range(n_layers))
    for r in recs.values():
        check_clock_records(r, 12, 1, model.args.n_kv_heads)  # slots 0..11: 8 prefilled, 4 decoded
    dec = VulkanDecoder(model, state, profile=True)
    dec.step(state, ids[0, 11:12], greedy=True)
    dec.replay(1)
    bounds = dispatch_bounds(recording_stamps_ns(be.dev, dec.body), dec.body.labels)
    assert len(bounds) == n_layers and all(a <= b for a, b in bounds)
    summary = phase_summary([(be.attention_clock(), dict(enumerate(bounds)))])
    assert summary["dispatches"] == n_layers and 0 <= summary["timestamps_share_clock"] <= 1
    dec.close()
    be.close()


def test_phase_clock_bad_input(be, monkeypatch):
    from llmopt.backends.vulkan.attention import CLOCK_GROUPS, CLOCK_LAYERS
    from llmopt.backends.vulkan.phase_clock import phase_summary

    monkeypatch.setattr(be, "_clock_buf", None)
    with pytest.raises(LlmoptError, match="no decode attention ran with attn_clock on"):
        be.attention_clock()
    if be.dev.features["shader_clock"]:
        for layer, grid in ((CLOCK_LAYERS, (1, 1, 1)), (0, (8, CLOCK_GROUPS // 8 + 1, 1))):
            with pytest.raises(LlmoptError, match=f"phase records hold {CLOCK_LAYERS} layers of {CLOCK_GROUPS}"):
                be._clock_binding(layer, grid)
    monkeypatch.setitem(be.dev.features, "shader_clock", False)
    monkeypatch.setattr(be, "attn_clock", True)
    spec = AttnSpec(4, 2, 16, 0.25)
    cache = be.kv_cache(1, 1, 4, 2, 16, [None])
    q, kv = be.from_host(torch.randn(1, 1, 64)), be.from_host(torch.randn(1, 1, 32))
    cos, sin = tables(1, 1, 16, torch.Generator().manual_seed(0))
    with pytest.raises(LlmoptError, match="lacks VK_KHR_shader_clock"):
        be.rope_attention(q, kv, kv, cos, sin, 16, cache, 0, 0, None, spec)
    with pytest.raises(LlmoptError, match="no samples"):
        phase_summary([])


@pytest.mark.parametrize("chunk_min", [1, 3])
def test_combine_more_splits_than_lanes(be, cpu, gen, chunk_min):
    """The combine keeps each lane's first split's (max, sum) in registers; with chunks of one slot the splits
    outnumber a subgroup's lanes (lavapipe's 8: 11 splits), so a lane's later splits are read again; left padding
    masks whole splits (their max -inf)."""
    spec = AttnSpec(6, 2, 32, 32 ** -0.5, softcap=20.0)
    assert run_case(be, cpu, gen, spec, prompt=19, decode=3, batch=3, pad=[0, 4, 11], chunk_min=chunk_min,
                    split_target=64) == 3


CLOCK_RUN = r'''
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_vulkan_models import FAMILIES, save_random
from llmopt.backends.vulkan import VulkanBackend
from llmopt.engine import load_model

be = VulkanBackend()
be.attn_clock, be.attn_chunk_min, be.attn_split_target = True, 2, 64
be.matvec_int_dot = be.matvec_x_q8 = bool(be.dev.features["integer_dot_product"])  # heads of 32: x8 rows bound too
model = load_model(save_random(FAMILIES["qwen2"](head_dim=32), Path(sys.argv[1]), 0), backend=be)
gen = model.generate([[5, 6, 7], [8, 9]], max_new_tokens=5, stop_ids=[])  # left padding, two steps in flight
assert gen.timings["decode_path"] == "replayed", gen.timings["decode_path"]
assert sorted(be.attention_clock()) == list(range(model.args.n_layers))
be.close()
print("done")
'''


@needs_clock
def test_phase_clock_runs_clean_under_validation_layer(tmp_path):
    """The clock build (VK_KHR_shader_clock enabled with both clocks, the record buffer bound; and the x8 rows'
    buffer, where the device has the int-dot mat-vec) in replayed greedy decoding under the Khronos validation layer
    with synchronization validation: no message."""
    run_under_validation_layer(CLOCK_RUN, str(tmp_path), str(Path(__file__).parent))



def test_phase_summary_arithmetic():
    """``phase_summary`` on hand-made records of one dispatch (a cached-slot split, the last split that combined,
    an inactive one; SM at 2 cycles a ns): every phase, the timeline against the bracketing timestamps, the clock
    rate, the realtime step and the arrival order come out as computed by hand."""
    from llmopt.backends.vulkan.attention import CLOCK_ACTIVE, CLOCK_COMBINER, CLOCK_LAST
    from llmopt.backends.vulkan.phase_clock import format_summary, phase_summary

    t0 = 1_000_000
    ns = np.array([[0, 100, 300, 350, 400, 600, 650, -1, -1],           # split 0: stops after counting its arrival
                   [20, 120, 320, 370, 420, 700, 750, 900, 1000],       # split 1: holds the slot, combines
                   [10, -1, -1, -1, -1, -1, -1, -1, -1]])               # split 2: past n_active, returned at once
    reached = ns >= 0
    recs = {0: {"realtime_ns": np.where(reached, t0 + ns, 0), "cycles": np.where(reached, 5000 + 2 * ns, 0),
                "arrival": np.array([0, 1, -1]), "flags": np.array([CLOCK_ACTIVE, CLOCK_ACTIVE | CLOCK_LAST |
                                                                       CLOCK_COMBINER, 0])}}
    s = phase_summary([(recs, {0: (t0 - 500.0, t0 + 1300.0)})])
    assert s["sm_ghz"] == pytest.approx(2.0) and s["realtime_step_ns"] == 10 and s["dispatches"] == 1
    assert s["last_split_arrived_last"] == 1.0 and s["timestamps_share_clock"] == 1.0
    own = [100, 200, 50, 50, 200, 50]
    assert list(s["phases_ns"]["cached-slot splits"].values()) == pytest.approx(own)
    assert list(s["phases_ns"]["last split"].values()) == pytest.approx(own[:4] + [280, 50])
    assert list(s["phases_ns"]["combiner (last to arrive)"].values()) == pytest.approx([150, 100])
    assert list(s["dispatch_ns"].values()) == pytest.approx([20, 700, 300, 1000, 500, 300, 1800, 800])
    assert "| combine: outputs |  |  | 100 |" in format_summary(s)
