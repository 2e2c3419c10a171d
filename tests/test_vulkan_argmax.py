"""The many-workgroup argmax (``shaders/argmax.comp``, ``llmopt.backends.vulkan.greedy``) and its folded softcap.

Against torch on fresh random rows of sizes that are multiples of nothing, 1-4 rows, 1 to 64 workgroups a row:
exact ids (lowest index among equal maxima, planted at several places, across workgroup slices too; NaNs never win;
a row of -inf gives 0xFFFFFFFF, as the one-workgroup kernel did). With the softcap folded: ids and the logits it
writes back bit-for-bit those of ``logits_softcap`` then the plain argmax. Every row's arrival counter 0 after each
dispatch. Whole tiny models: the replayed greedy step (softcap folded, chained and not, two steps in flight) gives
the eager path's tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmopt.engine import load_model

from vulkan_device import require_vulkan
vulkan = require_vulkan()
pytestmark = pytest.mark.vulkan

from tiny_models import COMMON, FAMILIES, save_random  # noqa: E402

NONE = 0xFFFFFFFF  # the id of a row with no value above -inf


def reference_ids(rows: torch.Tensor) -> torch.Tensor:
    """torch.argmax with NaNs never winning (first index of the max) and rows without a value above -inf -> NONE."""
    clean = torch.where(rows.isnan(), torch.full_like(rows, -float("inf")), rows)
    ids = clean.argmax(-1)
    return torch.where(clean.amax(-1) == -float("inf"), torch.full_like(ids, NONE), ids)


def arrivals_zero(be) -> bool:
    return not be.dev.download(be._argmax_arrivals, be._argmax_arrivals.nbytes, np.uint32).any()


def device_ids(be, rows: torch.Tensor, softcap: float | None = None):
    """(ids, the logits left on the device) of ``_argmax`` over ``rows``."""
    act = be.from_host(rows)
    idx = be._alloc(4 * act.rows, "test ids")
    be._argmax(act, be._whole(idx), softcap)
    ids = torch.from_numpy(be.dev.download(idx, 4 * act.rows, np.uint32).astype(np.int64))
    be._release(idx)
    return ids, be.to_host(act)


def planted_rows(gen, rows: int, n: int, groups: int) -> torch.Tensor:
    """Random rows with each row's maximum planted at 2-4 places, at slice boundaries where there are several."""
    x = torch.randn(rows, n, generator=gen)
    slice_len = -(-n // groups)
    for r in range(rows):
        edges = [g * slice_len for g in range(1, groups) if g * slice_len < n]
        spots = torch.randint(0, n, (4,), generator=gen).tolist()[: 2 + r % 3] + edges[r % 2::3][:2]
        x[r, spots] = float(x[r].max()) + 1.0
    return x


@pytest.mark.parametrize("groups", [1, 3, 7, 64])
def test_argmax_matches_torch(be, gen, monkeypatch, groups):
    monkeypatch.setattr(be, "argmax_groups", groups)
    for rows, n in ((1, 1), (2, 5), (3, 37), (4, 1003), (1, 4099), (2, 151)):
        x = planted_rows(gen, rows, n, min(groups, -(-n // be.wg_reduce)))
        ids, back = device_ids(be, x)
        assert torch.equal(ids, reference_ids(x)), (groups, rows, n)
        assert torch.equal(back, x) and arrivals_zero(be), (groups, rows, n)  # read only without a softcap
        assert torch.equal(be.argmax(be.from_host(x)), reference_ids(x))


@pytest.mark.parametrize("groups", [1, 5])
def test_argmax_nan_and_minus_inf_rows(be, gen, monkeypatch, groups):
    monkeypatch.setattr(be, "argmax_groups", groups)
    x = torch.randn(4, 203, generator=gen)
    x[0] = -float("inf")  # no value above -inf
    x[1, ::3] = float("nan")  # NaNs skipped, the max among the rest
    x[2] = -float("inf")
    x[2, 150] = -1e30  # one finite value, in a late slice
    x[3, :] = float("nan")
    x[3, 7] = 2.0
    ids, _ = device_ids(be, x)
    assert ids.tolist() == [NONE, int(reference_ids(x)[1]), 150, 7]
    assert arrivals_zero(be)


@pytest.mark.parametrize("groups", [1, 4, 9])
def test_folded_softcap_is_bit_exact(be, gen, monkeypatch, groups):
    """ids and the logits written back equal logits_softcap's in place then the plain argmax, bit for bit; ties
    that the cap makes (values past 15 caps saturate to cap) resolved to the lowest index."""
    monkeypatch.setattr(be, "argmax_groups", groups)
    for cap, rows, n in ((30.0, 1, 777), (3.0, 3, 1001), (50.0, 4, 65)):
        x = planted_rows(gen, rows, n, groups) * (cap / 2)
        x[0, n // 3] = x[0, n // 2] = 40 * cap  # both cap to cap: equal, the first wins
        act = be.from_host(x)
        be._softcap(act, cap)
        want_logits = be.to_host(act)
        want_ids = be.argmax(act)
        ids, logits = device_ids(be, x, cap)
        assert torch.equal(logits.view(torch.int32), want_logits.view(torch.int32)), (cap, rows, n)
        assert torch.equal(ids, want_ids), (cap, rows, n)
        assert torch.equal(ids, reference_ids(want_logits)) and arrivals_zero(be)


def test_many_rows_in_several_dispatches(be, gen, monkeypatch):
    from llmopt.backends.vulkan import greedy

    monkeypatch.setattr(greedy, "ARGMAX_ROWS", 3)  # 7 rows: dispatches of 3, 3, 1 rows, one counter set
    monkeypatch.setattr(be, "argmax_groups", 3)
    x = planted_rows(gen, 7, 300, 3)
    assert torch.equal(be.argmax(be.from_host(x)), reference_ids(x)) and arrivals_zero(be)


@pytest.mark.parametrize("chain", ["off", "chain"])
def test_replayed_greedy_folds_softcap(be, tmp_path, monkeypatch, chain):
    """Tiny Gemma 2 (final softcap 3.0) and Qwen2 (none): the replayed greedy tokens (the softcap folded into the
    argmax), two steps in flight, equal the eager path's (logits_softcap, then the argmax); counters 0 after."""
    monkeypatch.setattr(be, "decode_chain", chain)
    monkeypatch.setattr(be, "argmax_groups", 5)
    for family in ("gemma2", "qwen2"):
        seed = int(torch.randint(0, 2**31 - 1, ()))
        model = load_model(save_random(FAMILIES[family](), tmp_path / f"{family}{chain}", seed), backend=be)
        prompt = torch.randint(0, COMMON["vocab_size"], (2, 4))
        logits, state = model.prefill(prompt, max_len=12)
        replayed = model.decode_greedy_steps(state, logits.argmax(-1), 6)
        assert state.decode_path == "replayed" and arrivals_zero(be)
        model.static_decode = False
        logits, state = model.prefill(prompt, max_len=12)
        eager, token = [], logits.argmax(-1)
        for _ in range(6):
            token = model.decode_step(state, token).argmax(-1)
            eager.append(token)
        name = f"{family} seed={seed} chain={chain}"
        assert torch.equal(replayed, torch.stack(eager, 1)), name
