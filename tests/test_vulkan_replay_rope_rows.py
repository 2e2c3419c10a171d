"""The replayed step's RoPE rows (``llmopt.backends.vulkan.replay``, lavapipe in CI): the host writes this step's
cos/sin rows of each RoPE kind into the step buffer, and the fused decode attention (``rope_attention``) ropes q
and this step's k from them instead of looking rows up in the tables of every position by a position word (one
memory round trip before q's rotation instead of two; docs/benchmarks.md, Vulkan v13).

* The rows in the step buffer are the RoPE rows of each sequence's position (within 1e-6 of ``rope_tables`` at
  that position; a row one position off differs by far more), for Gemma 3's two RoPE kinds and left-padded
  sequences at different positions, both for the next step and for a step queued one ahead (two in flight).
* With the device tables of every position zeroed after recording, the replayed logits still equal the eager
  ones bit for bit, step after step (the fused attention reads no table row: zero rows would zero q and k), and
  the recording holds no separate rope dispatch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmopt.engine import load_model
from llmopt.engine.rope import rope_tables

from vulkan_device import require_vulkan
vulkan = require_vulkan()
pytestmark = pytest.mark.vulkan

from llmopt.backends.vulkan.replay import VulkanDecoder  # noqa: E402
from tiny_models import COMMON, FAMILIES, save_random  # noqa: E402

VOCAB = COMMON["vocab_size"]


def padded_prefill(model, ids, n_prompt: int):
    mask = torch.ones(ids.shape[0], n_prompt, dtype=torch.bool)
    mask[0, :2] = False  # sequence 0 left-padded: its positions trail sequence 1's by two
    return model.prefill(ids[:, :n_prompt], mask, max_len=ids.shape[1] + 2)


def test_step_buffer_holds_each_rope_kinds_rows(be, tmp_path):
    model = load_model(save_random(FAMILIES["gemma3"](), tmp_path, int(torch.randint(0, 2**31 - 1, ()))), backend=be)
    ids = torch.randint(0, VOCAB, (2, 9))
    _, state = padded_prefill(model, ids, 5)
    ropes = sorted(set(model.args.rope_layers), key=repr)
    assert len(ropes) == 2  # sliding and full attention layers: two kinds of rows
    dec = VulkanDecoder(model, state)
    try:
        for parity, ahead in ((0, 0), (1, 1)):
            dec._write(state, parity, ahead)
            pos = state.next_pos + ahead
            assert pos[0] != pos[1]
            rows = dec.step_floats[parity]
            for i, rope in enumerate(ropes):
                cos, sin = rope_tables(rope, pos.view(-1, 1), model.args.head_dim)
                for name, want in ((f"cos{i}", cos), (f"sin{i}", sin)):
                    at = dec.offsets[name] // 4
                    got = torch.from_numpy(rows[at:at + want.numel()].copy()).view_as(want)
                    assert (got - want).abs().max() <= 1e-6, (name, parity, ahead)
    finally:
        dec.close()


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_fused_replay_ropes_from_the_step_rows_only(be, tmp_path, family):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    model = load_model(save_random(FAMILIES[family](), tmp_path, seed), backend=be)
    ids = torch.randint(0, VOCAB, (2, 10))
    model.static_decode = False
    _, eager_state = padded_prefill(model, ids, 5)
    eager = [model.decode_step(eager_state, ids[:, t]) for t in range(5, ids.shape[1])]
    _, state = padded_prefill(model, ids, 5)
    dec = VulkanDecoder(model, state, profile=True)
    try:
        labels = dec.body.labels
        assert "rope_attention" in labels and "rope" not in labels, sorted(set(labels))
        for table in (t for pair in dec.tables.values() for t in pair):
            be.dev.upload(table, np.zeros(table.nbytes // 4, np.float32))
        for step, t in enumerate(range(5, ids.shape[1])):
            got = dec.step(state, ids[:, t])
            assert torch.equal(got, eager[step]), f"{family} seed={seed}: step {step} differs from eager"
    finally:
        dec.close()
