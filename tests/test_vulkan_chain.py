"""Chained dispatches in the replayed decode step (``llmopt.backends.vulkan.chain``), on lavapipe with the chain
forced on.

Lavapipe runs one dispatch after another, so every wait passes at once: these tests check what a GPU would compute
with the chain (the same results), the bookkeeping that makes it safe there, and the failure path, not the overlap:
* tiny Qwen2, Qwen2-sliding, Gemma 2 and Gemma 3 int4 models, in the GPU configuration (int-dot mat-vecs, x8 rows,
  the gated and the producer-norm epilogues, Gemma's sandwich norms folded, the mat-vecs' early weight loads) and in
  lavapipe's own: the chained replayed step's logits equal the barrier path's bit for bit (exact: same shaders,
  same order of arithmetic), and greedy tokens with two steps in flight are equal;
* the decode attention's loads before its wait (rope_attention.glsl's chain_early): contexts of several splits,
  its value stage used from slot 0, after the registers' first block, cut short (the rest read from the cache) and
  not at all: logits bit for bit, greedy tokens of unequal prompts equal; the stage's size against shared memory;
* every activation of the chained body in a buffer of its own (each written once a step);
* every dispatch of the body recorded chained, behind no barrier but the first; each ticket equal to an independent
  count (the workgroups of every dispatch recorded before it, summed from the dispatches as the device saw them:
  a ticket off by one fails), and the counter read back after the step equal to the body's workgroups;
* a ticket made unreachable (also a decode attention's): the wait gives up and the step raises the LlmoptError
  naming that dispatch; a step whose workgroups the host miscounted: the counter read back disagrees and it raises;
* one greedy run of the chain under the Khronos validation layer, without synchronization validation (it cannot
  see a counter in memory, so it would report every dependent dispatch pair without a barrier as a hazard; the
  barrier path keeps its synchronization-validated tests: test_vulkan_producer_norm, test_vulkan_replay).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from llmopt.engine import load_model
from llmopt.errors import LlmoptError
from llmopt.quant.quantizers import Spec

from vulkan_device import CHAINED_SHADERS, GPU_CONFIG, require_vulkan, run_under_validation_layer, tiny_int4_script
vulkan = require_vulkan("integer_dot_product")
from llmopt.backends.vulkan import chain as vk_chain  # noqa: E402
from llmopt.backends.vulkan import compile as vk_compile  # noqa: E402
from llmopt.backends.vulkan.replay import VulkanDecoder  # noqa: E402
from tiny_models import COMMON, FAMILIES, pack_folder, save_random  # noqa: E402

pytestmark = pytest.mark.vulkan



def int4_model(be, tmp_path, family):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    folder = pack_folder(save_random(FAMILIES[family](), tmp_path / "f", seed), tmp_path / "q",
                         [Spec(4, 32, sym=False)])
    return load_model(folder, backend=be), f"{family} seed={seed}"


class Seen:
    """The body's dispatches as the device records them (label, workgroups), its barriers before dispatches, and
    the buffers the backend hands out for its activations."""

    def __init__(self, be, monkeypatch):
        self.dispatches, self.barriers, self.allocated = [], 0, []
        dev = be.dev
        dispatch, barrier, alloc = dev.dispatch, dev._barrier, be._alloc

        def seen_alloc(nbytes, name="activation"):
            buf = alloc(nbytes, name)
            if dev.chain is not None:
                self.allocated.append(id(buf))
            return buf

        def seen_dispatch(pipe, bindings, push, groups, label=None):
            if dev.chain is not None and all(g > 0 for g in groups):
                self.dispatches.append((label or pipe.name, groups[0] * groups[1] * groups[2]))
            return dispatch(pipe, bindings, push, groups, label)

        def seen_barrier(stage):
            if dev.chain is not None and stage == "compute":
                self.barriers += 1
            return barrier(stage)

        monkeypatch.setattr(dev, "dispatch", seen_dispatch)
        monkeypatch.setattr(dev, "_barrier", seen_barrier)
        monkeypatch.setattr(be, "_alloc", seen_alloc)


def decode(model, ids, n_prompt):
    """Logits of a prefill and of replayed steps over ``ids[:, n_prompt:]``, and the decoder (open)."""
    logits, state = model.prefill(ids[:, :n_prompt], max_len=ids.shape[1] + 1)
    dec = VulkanDecoder(model, state)
    steps = [logits] + [dec.step(state, ids[:, t]) for t in range(n_prompt, ids.shape[1])]
    return torch.stack(steps), dec


@pytest.mark.parametrize("config", ["gpu", "gpu max 8", "lavapipe"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chain_equals_barrier_path(be, tmp_path, monkeypatch, family, config):
    """The GPU configuration (the chained mat-vecs' first chunk of weights loaded before the wait), the same with
    dispatches of over 8 workgroups left behind barriers ("gpu max 8"), and lavapipe's own (no early loads)."""
    if config.startswith("gpu"):
        for key in GPU_CONFIG:
            monkeypatch.setattr(be, key, True)
    monkeypatch.setattr(be, "chain_early", 0 if config == "lavapipe" else 1)
    max_groups = 8 if config == "gpu max 8" else 1 << 31
    monkeypatch.setattr(vk_chain, "MAX_GROUPS", max_groups)
    model, name = int4_model(be, tmp_path, family)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 9))
    monkeypatch.setattr(be, "decode_chain", "off")
    want, dec = decode(model, ids, 3)
    assert dec.chain is None
    dec.close()
    monkeypatch.setattr(be, "decode_chain", "chain")
    seen = Seen(be, monkeypatch)
    got, dec = decode(model, ids, 3)
    try:
        # every activation of the chained body in a buffer of its own: each written once a step (chain.py)
        assert len(seen.allocated) == len(set(seen.allocated)) > 0, name
        assert torch.equal(got, want), f"{name}: chained logits differ by {(got - want).abs().max():.2e}"
        # every dispatch of the body chained (up to max_groups workgroups), barriers only before the first and after
        # an unchained one, tickets from an independent count
        links, chained = dec.chain.links, [d for d in seen.dispatches if d[1] <= max_groups]
        assert [(link.label, link.groups) for link in links] == chained, name
        unchained = len(seen.dispatches) - len(chained)
        assert 0 < unchained < len(chained) if config == "gpu max 8" else unchained == 0, (name, unchained)
        assert 1 <= seen.barriers <= 1 + 2 * unchained, (name, seen.barriers)
        total = 0
        for i, ((label, groups), link) in enumerate(zip(chained, links)):
            assert link.ticket == total, f"{name}: dispatch {i} ({label}) ticket {link.ticket}, expected {total}"
            total += groups
        counter, error = (int(v) for v in dec.chain_out[0].view(np.uint32, 2))
        assert (counter, error) == (total, 0), name
    finally:
        dec.close()
    # greedy generation, two replayed steps in flight: the barrier path's tokens
    prompts = [[5, 6, 7], [8, 9]]
    tokens = {}
    for mode in ("off", "chain"):
        monkeypatch.setattr(be, "decode_chain", mode)
        gen = model.generate(prompts, max_new_tokens=6, stop_ids=[])
        assert gen.timings["decode_path"] == "replayed", gen.timings["decode_path"]
        tokens[mode] = gen.tokens
    assert tokens["chain"] == tokens["off"], name


# The decode attention's loads ahead, chained (rope_attention.glsl: issued before the wait; where the teams' first
# keys cover the chunk, more cached values staged in shared memory). Lavapipe's subgroups are 8 wide and its stage
# holds 4 floats an invocation (rows of 16): with 64 invocations (8 teams) chunks of 4 stage all their values; with
# 256 (32 teams) chunks of 20 load the first 16 values into registers and stage values 16..19 (at 2 rows: 16, 17,
# the rest from the cache); chunks of 20 with 8 teams stage only in the last split, whose few cached slots the
# teams' first keys cover (the others take the long-context path).
ATTN_AHEAD = {"splits of 4, wg 64": {"attn_chunk_min": 4, "attn_wg": 64},
              "splits of 20, wg 256": {"attn_chunk_min": 20, "attn_wg": 256},
              "splits of 20, wg 256, 2 rows": {"attn_chunk_min": 20, "attn_wg": 256, "attn_stage_slots": 2},
              "splits of 20, wg 64": {"attn_chunk_min": 20, "attn_wg": 64}}


@pytest.mark.parametrize("config", sorted(ATTN_AHEAD))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chained_attention_loads_ahead(be, tmp_path, monkeypatch, family, config):
    """Contexts of 20-30 slots in several splits: chained logits equal the barrier path's bit for bit, greedy
    tokens (unequal prompts: left padding, two steps in flight) equal."""
    for key in GPU_CONFIG:
        monkeypatch.setattr(be, key, True)
    monkeypatch.setattr(be, "chain_early", 1)
    monkeypatch.setattr(be, "attn_split_target", 64)
    for key, value in ATTN_AHEAD[config].items():
        monkeypatch.setattr(be, key, value)
    model, name = int4_model(be, tmp_path, family)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 30))
    got = {}
    for mode in ("off", "chain"):
        monkeypatch.setattr(be, "decode_chain", mode)
        got[mode], dec = decode(model, ids, 20)
        assert (dec.chain is None) == (mode == "off")
        dec.close()
        prompts = [ids[0, :18].tolist(), ids[1, :23].tolist()]
        got[mode + " tokens"] = model.generate(prompts, max_new_tokens=6, stop_ids=[]).tokens
    assert torch.equal(got["chain"], got["off"]), f"{name}: differ by {(got['chain'] - got['off']).abs().max():.2e}"
    assert got["chain tokens"] == got["off tokens"], name


def test_attention_stage_fits_shared_memory(be, monkeypatch):
    """The chained attention's stage: whole value rows, at most attn_stage_slots and 4 floats an invocation, in the
    device's shared memory beside the kernel's other arrays; 1 float (none) where nothing is left."""
    for wg, head_dim, slots, rows in ((16, 16, 256, 4), (64, 16, 256, 16), (64, 16, 6, 6), (16, 16, 0, 0),
                                      (1024, 128, 256, 32), (1024, 256, 256, 16)):
        monkeypatch.setattr(be, "attn_wg", wg)
        monkeypatch.setattr(be, "attn_stage_slots", slots)
        stage = be._attn_stage(head_dim, 1)
        left = be._shared_limit() - be._fused_shared_bytes(1) - 16
        assert stage == max(1, min(rows * head_dim, left // 4 // head_dim * head_dim)), (wg, head_dim, slots)
        assert 4 * stage <= max(4, left)
    monkeypatch.setattr(be, "attn_wg", 1024)
    monkeypatch.setattr(be, "attn_stage_slots", 256)
    monkeypatch.setattr(be, "_shared_limit", lambda: be._fused_shared_bytes(1) + 16 + 4 * 127)
    assert be._attn_stage(128, 1) == 1  # 127 floats left: not one row of 128


UNREACHABLE = 1 << 30  # a ticket past any step's workgroups


def unreachable_ticket(monkeypatch, chosen) -> list:
    """Record the first chained dispatch for which ``chosen(chain, pipe, label)`` holds with a ticket past every
    workgroup of the step (its wait can only time out); returns the list its index goes into once recorded."""
    variant, hit = vk_chain.Chain.variant, []

    def late(self, pipe, key, push, groups, label):
        out = variant(self, pipe, key, push, groups, label)
        if out is not None and not hit and chosen(self, pipe, label):
            hit.append(len(self.links) - 1)
            self.links[-1].ticket = UNREACHABLE
            out = (out[0], out[1], out[2][:vk_chain.TICKET_OFFSET] + struct.pack("<I", UNREACHABLE))
        return out

    monkeypatch.setattr(vk_chain.Chain, "variant", late)
    return hit


@pytest.mark.parametrize("target", ["dispatch 2", "rope_attention"])
def test_unreachable_ticket_times_out(be, tmp_path, monkeypatch, target):
    """One dispatch's ticket past the step's workgroups (the body's 3rd, or its first decode attention, which loads
    ahead before that wait): its wait gives up, the step raises naming it."""
    model, name = int4_model(be, tmp_path, "qwen2")
    monkeypatch.setattr(be, "decode_chain", "chain")
    hit = unreachable_ticket(monkeypatch, lambda chain, pipe, label: len(chain.links) == 3 if target == "dispatch 2"
                             else pipe.name == "rope_attention")
    ids = torch.randint(0, COMMON["vocab_size"], (1, 5))
    logits, state = model.prefill(ids[:, :4], max_len=8)
    dec = VulkanDecoder(model, state)
    try:
        assert len(hit) == 1, hit
        with pytest.raises(LlmoptError, match=rf"chained dispatches timed out: dispatch {hit[0]} \(.*set chain off"):
            dec.step(state, ids[:, 4])
    finally:
        dec.close()


def test_miscounted_step_raises(be, tmp_path, monkeypatch):
    """The host's count of the step's workgroups one short of what ran (as if a workgroup signalled twice): the
    counter read back ends one past it, and the step raises naming both numbers."""
    model, name = int4_model(be, tmp_path, "qwen2")
    monkeypatch.setattr(be, "decode_chain", "chain")
    variant = vk_chain.Chain.variant

    def short(self, pipe, key, push, groups, label):
        out = variant(self, pipe, key, push, groups, label)
        if out is not None and len(self.links) == 2:
            self.count -= 1  # lavapipe runs dispatches in order: the later, lower tickets only pass sooner
        return out

    monkeypatch.setattr(vk_chain.Chain, "variant", short)
    ids = torch.randint(0, COMMON["vocab_size"], (1, 5))
    logits, state = model.prefill(ids[:, :4], max_len=8)
    dec = VulkanDecoder(model, state)
    try:
        total = dec.chain.count
        with pytest.raises(LlmoptError, match=rf"counter ended at {total + 1}, not at its {total} workgroups: a "
                                              "chained dispatch lost or repeated its signal"):
            dec.step(state, ids[:, 4])
    finally:
        dec.close()


def test_bad_mode_is_named(be, tmp_path, monkeypatch):
    model, _ = int4_model(be, tmp_path, "qwen2")
    monkeypatch.setattr(be, "decode_chain", "sometimes")
    logits, state = model.prefill(torch.tensor([[1, 2, 3]]), max_len=6)
    with pytest.raises(LlmoptError, match="decode chain mode 'sometimes': expected one of 'auto', 'chain'"):
        VulkanDecoder(model, state)


@pytest.mark.parametrize("family,fold", [("qwen2", False), ("gemma2", False), ("gemma2", True)])
def test_auto_chains_where_measured_faster(be, tmp_path, monkeypatch, family, fold):
    """"auto" (the GPU default) chains Qwen2's step, and Gemma's where its sandwich norms are folded into the
    mat-vecs before them (v21); Gemma's unfolded sandwich norms stay on barriers (slower chained, v18)."""
    model, _ = int4_model(be, tmp_path, family)
    monkeypatch.setattr(be, "decode_chain", "auto")
    monkeypatch.setattr(be, "fuse_sandwich_norm", fold)
    barriers = family == "gemma2" and not fold
    assert vk_chain.chain_mode("auto", model.args, fold) == ("off" if barriers else "chain")
    logits, state = model.prefill(torch.tensor([[1, 2, 3]]), max_len=6)
    dec = VulkanDecoder(model, state)
    try:
        assert (dec.chain is None) == barriers
    finally:
        dec.close()


def test_device_config_chains_on_gpus_only():
    gpu = {"device": {"type": "discrete_gpu", "subgroup_size": 32, "max_workgroup_invocations": 1024},
           "features": {"subgroup_arithmetic": True, "integer_dot_4x8_signed_accelerated": True}}
    spec = vk_compile.device_config(gpu)["spec"]
    assert (spec["decode_chain"], spec["chain_early"]) == ("auto", 1)
    spec = vk_compile.device_config(vulkan.probe())["spec"]  # lavapipe: one dispatch after another
    assert (spec["decode_chain"], spec["chain_early"]) == ("off", 0)


def test_chained_builds_listed_and_checked(tmp_path):
    """Every shader that includes chain.glsl gets a ``_chain`` build; check_manifest refuses one that is missing."""
    comps = sorted(vk_compile.REPO_SHADERS.glob("*.comp"))
    chained = {stem[:-len("_chain")] for _, stem, d in vk_compile.builds(comps, {}) if d.get("CHAIN") == 1}
    assert chained == CHAINED_SHADERS
    probe = vulkan.probe()
    out = tmp_path / "spv"
    vk_compile.compile_shaders(vk_compile.REPO_SHADERS, out, probe)
    vk_compile.check_manifest(out)
    (out / "rmsnorm_chain.spv").unlink()
    with pytest.raises(LlmoptError, match="rmsnorm_chain.spv: SPIR-V for shader 'rmsnorm_chain' is missing"):
        vk_compile.check_manifest(out)


CHAIN_RUN = tiny_int4_script("qwen2") + r'''
be.decode_chain = "chain"
be.attn_wg, be.attn_chunk_min, be.attn_split_target = 64, 4, 64  # splits of 4, their values staged (8 teams)
model = load_model(folder, backend=be)
gen = model.generate([[5, 6, 7], [8, 9]], max_new_tokens=6, stop_ids=[])  # left padding, two steps in flight
assert gen.timings["decode_path"] == "replayed", gen.timings["decode_path"]
be.close()
print("done")
'''


def test_chain_runs_clean_under_validation_layer(tmp_path):
    """Greedy decoding with the chain on (the attention in splits of 4 slots, staging its values), two replayed steps
    in flight, under the Khronos validation layer without synchronization validation (see the module docstring): no
    message."""
    run_under_validation_layer(CHAIN_RUN, str(tmp_path), str(Path(__file__).parent), sync=False)
