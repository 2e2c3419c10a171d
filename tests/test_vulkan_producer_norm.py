"""The residual add and the next RMSNorm folded into the o / down mat-vec (``VulkanBackend.linear_add_rmsnorm``,
``llmopt.backends.vulkan.producer_norm``), on lavapipe with the int-dot mat-vec, x8 rows and the fold forced on.

Tolerances (fresh random inputs; widths that are not multiples of a workgroup's 32 or 64 outputs included):
* the new residual against float64 ``residual + int8_chunks(x) W^T (+ b)``: relative error below ``RTOL`` = 2e-5;
* the x8 rows against a torch quantization of ``r * (w + offset)`` (r: the device's new residual): codes within 1,
  at most 1% off by one, scales within 1e-6 relative, each chunk's code sum equal to its codes' sum;
* the partial sums of squares: their row sum within 1e-5 of ``sum(r^2)``;
* the first block's norm folded into the embedding (``embedding_rmsnorm``): the same checks, its rows against float64
  table rows within 1e-6;
* readers (a plain int4 mat-vec, the gated gate+up mat-vec, and an int8 mat-vec that needs floats) against float64
  references built from those x8 rows scaled by 1 / rms: relative error below ``RTOL``; the floats made on demand
  equal the ``rmsnorm`` of the new residual bit for bit (also in the build without subgroup arithmetic);
* whole tiny models: replayed logits equal eager ones bit for bit; within ``RTOL_X8`` = 2e-2 (relative, in norm)
  of the unfolded path (the x8 codes of r * w and of r / rms * w may differ by 1 in rounding, and a flipped code
  travels through the later layers: measured up to ~6e-3) and within ``MODEL_RTOL`` = 6e-2 of the CPU backend (x
  as int8 per 32 values, as in test_vulkan_matvec); every o and down projection counted as folded (the last down
  folds the final norm, which the head reads; a model that silently misses the fold fails); Gemma's sandwich
  norms take no fold; a model of int4 and int8 weights (int8 readers: floats made on demand) the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmopt.backends.cpu import CpuBackend
from llmopt.engine import load_model
from llmopt.errors import LlmoptError
from llmopt.quant.quantizers import Spec

from vulkan_device import folded_greedy_script, no_subgroup_backend, require_vulkan, run_under_validation_layer
vulkan = require_vulkan("integer_dot_product")
from llmopt.backends.vulkan.backend import MATVEC_MAX_M, int8_chunks  # noqa: E402
from test_vulkan_ops import random_qt, rel_err  # noqa: E402
from test_vulkan_x8_gated import ACTS, read_x8, x8_reference  # noqa: E402
from tiny_models import COMMON, FAMILIES, pack_folder, save_random  # noqa: E402

pytestmark = pytest.mark.vulkan

RTOL = 2e-5
RTOL_X8 = 2e-2  # the folded against the unfolded model: x8 codes of r * w, not of r / rms * w (a code may differ by 1)
MODEL_RTOL = 6e-2  # a model's logits with x as int8 per 32 values against the CPU's float x (test_vulkan_matvec)
EPS = 1e-6


@pytest.fixture
def fast(be, monkeypatch):
    """The GPU configuration: int-dot mat-vecs, x8 rows, the gated epilogue and the producer norm."""
    for key in ("matvec_int_dot", "matvec_x_q8", "fuse_gated_act", "fuse_producer_norm", "fuse_embedding_norm"):
        monkeypatch.setattr(be, key, True)
    return be


def weight(be, name, gen, n, k, bits=4, bias=False):
    qt = random_qt(n, k, bits, 32, bits != 4, torch.float16, gen)
    b = torch.randn(n, generator=gen) if bias else None
    return be.linear_weight(name, qt, b), qt.dequantize(torch.float64), b


def record_folds(monkeypatch, be, op: str) -> list:
    """Wrap the backend's fold ``op`` (``linear_add_rmsnorm`` or ``linear_norm_add_rmsnorm``): each call appends
    whether it folded its norm to the list returned."""
    folds, fold = [], getattr(be, op)

    def counted(*args):
        out = fold(*args)
        folds.append(out[1].rms is not None)
        return out

    monkeypatch.setattr(be, op, counted)
    return folds


def parts_of(be, normed) -> torch.Tensor:
    rms = normed.rms
    return torch.from_numpy(be.dev.download(rms.parts, 4 * normed.rows * rms.n_parts)).view(normed.rows, -1)


def check_folded_x8(be, gen, normed, rh, g, unit_offset, case) -> torch.Tensor:
    """A folded norm of the new residual ``rh`` (host floats, ``normed.rows`` rows): its x8 rows against a torch
    quantization of ``rh * (g + offset)``, its partial sums against float64 ``sum(rh^2)`` a row, and an int4 mat-vec
    reading them against float64; returns x as the readers see it (x8 rows / rms, float64 ``[rows, features]``)."""
    m, f = normed.rows, normed.features
    values, scales, sums = read_x8(be, normed)
    want_codes, want_scales = x8_reference((rh * (g + (1.0 if unit_offset else 0.0))).reshape(m, f))
    diff = (values - want_codes).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01, case
    assert rel_err(scales, want_scales) < 1e-6 and torch.equal(sums, values.sum(-1).to(torch.int32)), case
    ss = rh.reshape(m, f).double().pow(2).sum(-1)
    assert rel_err(parts_of(be, normed).double().sum(-1), ss) < 1e-5, case
    xq = (values.double() * scales.double()[..., None]).reshape(m, f) * (ss / f + EPS).rsqrt()[:, None]
    wq, wq64, bq = weight(be, "q_proj", gen, 48, f, bias=True)
    assert rel_err(be.to_host(be.linear(normed, wq)), xq @ wq64.T + bq.double()) < RTOL, case
    return xq


# layouts: 8 sets of 4 outputs (lavapipe's default), 8 sets of 8 (64 outputs: f = 96 and 160 leave the last workgroup
# one or three chunks), one set of 32 rows (no subgroup sets), 16 sets of 2 in sets of 2 invocations (narrower than
# lavapipe's subgroups: sums through shared memory), the GPU default (8 sets of 128 invocations, 4 rows) and the
# GPU's sandwich layout (4 sets of 128, 8 rows: v23)
def check_fold(be, gen, f, k, m, bias, unit_offset, case):
    """One fold (o projection of f outputs over k inputs, m rows) and its three readers against float64."""
    wo, wo64, bo = weight(be, "o_proj", gen, f, k, bias=bias)
    x, res, g = torch.randn(1, m, k, generator=gen), torch.randn(1, m, f, generator=gen), torch.randn(f, generator=gen)
    r, normed = be.linear_add_rmsnorm(be.from_host(x), wo, be.from_host(res), be.param("norm", g), EPS, unit_offset)
    assert normed.rms is not None and normed._buf is None, case  # the fold ran: no floats made
    rh = be.to_host(r)
    want = res.double() + int8_chunks(x) @ wo64.T + (bo.double() if bias else 0.0)
    assert rel_err(rh, want) < RTOL, case
    assert parts_of(be, normed).shape[1] == -(-f // be._norm_sets("norm_layout")[1])
    xq = check_folded_x8(be, gen, normed, rh, g, unit_offset, case)
    gate, g64, _ = weight(be, "gate_proj", gen, 64, f)
    up, u64, _ = weight(be, "up_proj", gen, 64, f)
    y = be.to_host(be.gated_linears(normed, gate, up, "silu"))
    assert be._fused[(id(gate), id(up))][1] is not None, case  # the gated mat-vec read the rows
    assert rel_err(y, ACTS["silu"](xq @ g64.T) * (xq @ u64.T)) < RTOL, case
    assert normed._buf is None, case
    # a reader that needs floats (int8 codes: x8 rows are in 4-bit order): the norm recorded on demand
    w8, w864, _ = weight(be, "k_proj", gen, 40, f, bits=8)
    got8 = be.to_host(be.linear(normed, w8))
    floats = be.to_host(normed)
    assert torch.equal(floats, be.to_host(be.rmsnorm(r, be.param("norm", g), EPS, unit_offset))), case
    assert rel_err(got8, int8_chunks(floats) @ w864.T) < RTOL, case


# layouts: 8 sets of 4 outputs (lavapipe's default), 8 sets of 8 (64 outputs: f = 96 and 160 leave the last workgroup
# one or three chunks), one set of 32 rows (no subgroup sets), 16 sets of 2 in sets of 2 invocations (narrower than
# lavapipe's subgroups: sums through shared memory), the GPU default (8 sets of 128 invocations, 4 rows) and the
# GPU's sandwich layout (4 sets of 128, 8 rows: v23)
@pytest.mark.parametrize("layout", [(64, 8, 4), (64, 8, 8), (32, 0, 32), (32, 2, 2), (1024, 128, 4), (512, 128, 8)])
@pytest.mark.parametrize("unit_offset", [False, True])
def test_fold_against_reference(fast, gen, monkeypatch, layout, unit_offset):
    monkeypatch.setattr(fast, "norm_layout", layout)
    for f, k, m, bias in [(96, 64, 1, True), (160, 288, 3, False), (64, 96, MATVEC_MAX_M, False)]:
        check_fold(fast, gen, f, k, m, bias, unit_offset, (layout, unit_offset, f, k, m))


def test_fold_without_subgroups(gen, tmp_path):
    """The build for devices without subgroup arithmetic (every sum through shared memory): the same checks."""
    be = no_subgroup_backend(tmp_path)
    try:
        for key in ("matvec_int_dot", "matvec_x_q8", "fuse_gated_act", "fuse_producer_norm"):
            setattr(be, key, True)
        for layout in ((64, 8, 4), (32, 0, 32)):
            be.norm_layout = layout
            check_fold(be, gen, 160, 96, 3, True, False, layout)
    finally:
        be.close()


def test_no_fold_where_it_cannot_apply(fast, gen, monkeypatch):
    """linear then add_rmsnorm (bit for bit) where the fold does not apply; the folded path otherwise."""
    be = fast
    x, res, g = (torch.randn(1, 1, 64, generator=gen), torch.randn(1, 1, 96, generator=gen),
                 be.param("norm", torch.randn(96, generator=gen)))
    wo, _, _ = weight(be, "o_proj", gen, 96, 64)

    def check(w, xs, rs, folded, why):
        r, normed = be.linear_add_rmsnorm(be.from_host(xs), w, be.from_host(rs), g, EPS, False)
        assert (normed.rms is not None) == folded, why
        if not folded:
            want_r, want_n = be.add_rmsnorm(be.from_host(rs), be.linear(be.from_host(xs), w), g, EPS, False)
            assert torch.equal(be.to_host(r), be.to_host(want_r)) and torch.equal(be.to_host(normed),
                                                                                  be.to_host(want_n)), why

    check(wo, x, res, True, "int4, 96 outputs")
    check(weight(be, "o_proj", gen, 96, 64, bits=8)[0], x, res, False, "int8 producer")
    check(weight(be, "o_proj", gen, 40, 64)[0], x, res[..., :40], False, "40 outputs: not whole chunks")
    prefill = torch.randn(1, MATVEC_MAX_M + 1, 64, generator=gen)
    check(wo, prefill, torch.randn(1, MATVEC_MAX_M + 1, 96, generator=gen), False, "prefill rows")
    for key in ("fuse_producer_norm", "matvec_x_q8", "matvec_int_dot"):
        monkeypatch.setattr(be, key, False)
        check(wo, x, res, False, f"{key} off")
        monkeypatch.setattr(be, key, True)
    with pytest.raises(LlmoptError, match="linear_add_rmsnorm o_proj: input has 96 features, weight expects 64"):
        be.linear_add_rmsnorm(be.from_host(res), wo, be.from_host(res), g, EPS, False)
    with pytest.raises(LlmoptError, match="linear_add_rmsnorm: the norm weight holds 8 values, 96 features"):
        be.linear_add_rmsnorm(be.from_host(x), wo, be.from_host(res), be.param("short", torch.ones(8)), EPS, False)


@pytest.mark.parametrize("layout,message", [
    ((64, 8, 2), "multiple of 32"), ((48, 8, 4), "power of two"), ((4096, 128, 4), "power of two up to"),
    ((64, 24, 16), "power of two dividing"), ((32, 0, 64), "at most the workgroup size"),
    ((1024, 32, 32), "shared memory")])
def test_bad_norm_layout_is_named(fast, gen, monkeypatch, layout, message):
    be = fast
    wo, _, _ = weight(be, "o_proj", gen, 64, 64)
    monkeypatch.setattr(be, "norm_layout", layout)
    with pytest.raises(LlmoptError, match=message):
        be.linear_add_rmsnorm(be.from_host(torch.randn(1, 1, 64, generator=gen)), wo,
                              be.from_host(torch.randn(1, 1, 64, generator=gen)),
                              be.param("norm", torch.ones(64)), EPS, False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_model_fold(be, tmp_path, monkeypatch, family):
    """Whole int4 models: every o and down projection folds its norm (Qwen2, with and without sliding windows;
    Gemma's sandwich norms: none) and the embedding the first block's, the replayed step equals the eager one bit for bit, both agree with the unfolded
    path and with the CPU backend."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    folder = pack_folder(save_random(FAMILIES[family](), tmp_path / "f", seed), tmp_path / "q",
                         [Spec(4, 32, sym=False)])
    model = load_model(folder, backend=be)
    ids = torch.randint(0, COMMON["vocab_size"], (1, 10))
    for key in ("matvec_int_dot", "matvec_x_q8", "fuse_gated_act"):
        monkeypatch.setattr(be, key, True)
    folds = record_folds(monkeypatch, be, "linear_add_rmsnorm")
    embeds = record_folds(monkeypatch, be, "_embed_norm")  # eager steps and the replayed step's recording
    runs = {}
    layers = model.args.n_layers
    for on in (False, True):
        monkeypatch.setattr(be, "fuse_producer_norm", on)
        monkeypatch.setattr(be, "fuse_embedding_norm", on)
        for replay in (False, True):
            folds.clear()
            embeds.clear()
            model.static_decode = replay
            logits, state = model.prefill(ids[:, :4], max_len=ids.shape[1] + 1)
            steps = [model.decode_step(state, ids[:, t]) for t in range(4, ids.shape[1])]
            assert state.decode_path == ("replayed" if replay else "eager: Model.static_decode is off")
            if family.startswith("gemma"):
                assert not folds, folds  # sandwich norms: norm_add_rmsnorm, never the fold
            else:  # every o and down projection of the prefill (4 rows: mat-vecs) and of each step, the last
                # down's with the final norm (the head reads it)
                assert len(folds) >= 2 * (2 * layers) and all(f == on for f in folds), (on, replay, folds)
            assert len(embeds) >= 2 and all(f == on for f in embeds), (on, replay, embeds)  # prefill, steps: the
            # first norm folded into the embedding (4 prompt rows and 1: mat-vec rows)
            runs[on, replay] = torch.stack([logits, *steps])
    name = f"{family} seed={seed}"
    for on in (False, True):
        assert torch.equal(runs[on, True], runs[on, False]), f"{name}: replayed differs from eager, fold {on}"
    assert rel_err(runs[True, False], runs[False, False]) < RTOL_X8, name
    cpu = load_model(folder, backend=CpuBackend())
    logits, state = cpu.prefill(ids[:, :4], max_len=ids.shape[1] + 1)
    ref = torch.stack([logits, *[cpu.decode_step(state, ids[:, t]) for t in range(4, ids.shape[1])]])
    assert rel_err(runs[True, True], ref) < MODEL_RTOL, name


def embed_reference(qt, ids: torch.Tensor, scale: float) -> torch.Tensor:
    table = qt if isinstance(qt, torch.Tensor) else qt.dequantize(torch.float64)
    return table.double()[ids] * scale


# tables: int4 g32 with zero points (bf16 scales), int8 g32 symmetric, float32; widths a multiple of the workgroup's
# values (32 on lavapipe, 64 with workgroups of 64: 160 is not, so there it takes the unfolded path)
@pytest.mark.parametrize("bits", [4, 8, 32])
@pytest.mark.parametrize("wg", [8, 64])
@pytest.mark.parametrize("unit_offset", [False, True])
def test_embedding_fold_against_reference(fast, gen, monkeypatch, bits, wg, unit_offset):
    """``embedding_rmsnorm`` (the first block's norm folded into the embedding): the rows against float64, the x8 rows
    of rows * (w + offset), the partial sums of squares, a reader against float64 and the floats made on demand equal
    the ``rmsnorm`` of the rows bit for bit."""
    be = fast
    monkeypatch.setattr(be, "wg", wg)
    for f, m in [(128, 1), (160, 3), (64, MATVEC_MAX_M)]:
        case = (bits, wg, unit_offset, f, m)
        vocab, scale = 50, 1.7
        if bits == 32:
            qt = torch.randn(vocab, f, generator=gen)
        else:
            qt = random_qt(vocab, f, bits, 32, bits != 4, torch.bfloat16, gen)
        table = be.embedding_table("embed_tokens", qt)
        ids = torch.randint(0, vocab, (1, m), generator=gen)
        g = torch.randn(f, generator=gen)
        x, normed = be.embedding_rmsnorm(ids, table, scale, be.param("norm", g), EPS, unit_offset)
        xh = be.to_host(x)
        assert rel_err(xh, embed_reference(qt, ids, scale)) < 1e-6, case
        want = be.rmsnorm(be.embedding(ids, table, scale), be.param("norm", g), EPS, unit_offset)
        if f % max(32, wg):
            assert normed.rms is None and torch.equal(be.to_host(normed), be.to_host(want)), case
            continue
        assert normed.rms is not None and normed._buf is None, case
        assert normed.rms.n_parts == f // max(32, wg), case
        check_folded_x8(be, gen, normed, xh, g, unit_offset, case)
        assert torch.equal(be.to_host(normed), be.to_host(want)), case


def test_no_embedding_fold_where_it_cannot_apply(fast, gen, monkeypatch):
    """``embedding`` then ``rmsnorm`` (bit for bit) for prefill rows and with the fold's switches off; a bad id or
    norm weight is named."""
    be = fast
    table = be.embedding_table("embed_tokens", random_qt(40, 64, 4, 32, False, torch.float16, gen))
    g = be.param("norm", torch.randn(64, generator=gen))

    def check(ids, folded, why):
        x, normed = be.embedding_rmsnorm(ids, table, 2.0, g, EPS, True)
        assert (normed.rms is not None) == folded, why
        want = be.embedding(ids, table, 2.0)
        assert torch.equal(be.to_host(x), be.to_host(want)), why
        assert torch.equal(be.to_host(normed), be.to_host(be.rmsnorm(want, g, EPS, True))), why

    check(torch.randint(0, 40, (1, 2), generator=gen), True, "two decode rows")
    check(torch.randint(0, 40, (1, MATVEC_MAX_M + 1), generator=gen), False, "prefill rows")
    for key in ("fuse_embedding_norm", "matvec_x_q8", "matvec_int_dot"):
        monkeypatch.setattr(be, key, False)
        check(torch.randint(0, 40, (1, 1), generator=gen), False, f"{key} off")
        monkeypatch.setattr(be, key, True)
    with pytest.raises(LlmoptError, match="embedding embed_tokens: token ids must lie in 0..39, got 3..40"):
        be.embedding_rmsnorm(torch.tensor([[3, 40]]), table, 1.0, g, EPS, False)
    with pytest.raises(LlmoptError, match="embedding_rmsnorm: the norm weight holds 8 values, 64 features"):
        be.embedding_rmsnorm(torch.tensor([[3]]), table, 1.0, be.param("short", torch.ones(8)), EPS, False)


FOLD_RUN = folded_greedy_script("qwen2", "linear_add_rmsnorm")


def test_fold_runs_clean_under_validation_layer(tmp_path):
    """Greedy decoding of a batch of two (left-padded) with the fold on, two replayed steps in flight, under the
    Khronos validation layer with synchronization validation: no message."""
    run_under_validation_layer(FOLD_RUN, str(tmp_path), str(Path(__file__).parent))



def test_tiny_model_mixed_widths(be, tmp_path, monkeypatch):
    """A Qwen2 model of int4 and int8 weights (alternating by name: o, down, q, v, up int4; k, gate, the head int8):
    the int8 readers of a folded norm get its floats made on demand, inside the replayed step's recording too;
    replayed = eager bit for bit, and within ``MODEL_RTOL`` of the CPU backend."""
    from llmopt.backends.vulkan.producer_norm import FoldedNorm

    seed = int(torch.randint(0, 2**31 - 1, ()))
    folder = pack_folder(save_random(FAMILIES["qwen2"](), tmp_path / "f", seed), tmp_path / "q",
                         [Spec(4, 32, sym=False), Spec(8, 32, sym=True)], offset=1)
    model = load_model(folder, backend=be)
    for key in ("matvec_int_dot", "matvec_x_q8", "fuse_gated_act", "fuse_producer_norm"):
        monkeypatch.setattr(be, key, True)
    folds, made = [], []
    fold, materialize = be.linear_add_rmsnorm, FoldedNorm.materialize

    def counted(*args):
        out = fold(*args)
        folds.append(out[1].rms is not None)
        return out

    def counted_materialize(self, act):
        made.append(act)
        return materialize(self, act)

    monkeypatch.setattr(be, "linear_add_rmsnorm", counted)
    monkeypatch.setattr(FoldedNorm, "materialize", counted_materialize)
    ids = torch.randint(0, COMMON["vocab_size"], (1, 10))
    runs = {}
    for replay in (False, True):
        model.static_decode = replay
        logits, state = model.prefill(ids[:, :4], max_len=ids.shape[1] + 1)
        runs[replay] = torch.stack([logits, *[model.decode_step(state, ids[:, t]) for t in range(4, ids.shape[1])]])
        assert state.decode_path == ("replayed" if replay else "eager: Model.static_decode is off")
    name = f"seed={seed}"
    assert folds and all(folds) and made, (name, folds, len(made))
    assert torch.equal(runs[True], runs[False]), f"{name}: replayed differs from eager"
    cpu = load_model(folder, backend=CpuBackend())
    logits, state = cpu.prefill(ids[:, :4], max_len=ids.shape[1] + 1)
    ref = torch.stack([logits, *[cpu.decode_step(state, ids[:, t]) for t in range(4, ids.shape[1])]])
    assert rel_err(runs[True], ref) < MODEL_RTOL, name
