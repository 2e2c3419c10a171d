"""End-to-end tuning of scales and zeros (``llmopt.quant.tune``) on tiny Gemma models, against direct computations:
the KL and its gradients against autograd and finite differences in float64, tuning lowering the calibration KL
with the codes unchanged, ``params`` selecting what is trained, the scheme key and its one-line errors."""

from __future__ import annotations

import pytest
import torch
from tiny_models import gemma2, gemma3, randomize, save_random

from llmopt.errors import LlmoptError
from llmopt.quant import schemes
from llmopt.quant.pipeline import quantize_model, tune_windows
from llmopt.quant.quantizers import Spec, quantize
from llmopt.quant.tune import TunedTensor, _Student, check_fits, head_kl, teacher_targets, tune


def _setup(family=gemma3, seed=0, dtype=torch.float64, tokens=12, n_windows=2):
    model = randomize(family(), seed).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if dtype == torch.float64:  # transformers' RMSNorms compute in float32, too coarse for finite differences
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.forward = (lambda x, m=m: m._norm(x) * (1.0 + m.weight))
    spec = Spec(4, 32, sym=False)
    tensors = {n: quantize(p.detach().float(), spec, "rtn", name=n) for n, p in model.named_parameters()
               if n.endswith(".weight") and p.dim() == 2}
    gen = torch.Generator().manual_seed(seed + 1)
    windows = [torch.randint(0, model.config.vocab_size, (tokens,), generator=gen) for _ in range(n_windows)]
    return model, tensors, windows


def _kl_and_grads(student, ids, targets, dtype):
    weights = student.weights()
    h_q = student.hidden(weights, ids)
    w_q = student.head_weight(weights)
    kl, gh, gw = head_kl(h_q.detach(), w_q.detach(), targets, student.softcap, grad_dtype=dtype)
    torch.autograd.backward([h_q, w_q], [gh, gw])
    return kl


@pytest.mark.parametrize("family", [gemma3, gemma2])  # gemma2: final logit soft-capping
def test_head_kl_matches_autograd_of_direct_kl(family):
    """``head_kl`` (all tokens kept) equals KL(softmax_f || softmax_q) computed directly, and its gradients equal
    autograd's, in float64 to 1e-10; with top-k < vocabulary, those of the bucketed KL (top-k + one tail bucket)."""
    model, _, _ = _setup(family)
    gen = torch.Generator().manual_seed(3)
    h_f, h_q = (torch.randn(9, 64, generator=gen, dtype=torch.float64) for _ in range(2))
    w_f = torch.randn(320, 64, generator=gen, dtype=torch.float64) * 0.3
    w_q = (w_f + 0.05 * torch.randn(320, 64, generator=gen, dtype=torch.float64)).requires_grad_(True)
    h_q.requires_grad_(True)
    cap = model.config.final_logit_softcapping

    def logits(h, w):
        x = h @ w.T
        return x if cap is None else torch.tanh(x / cap) * cap

    for k in (320, 17):
        targets = teacher_targets(h_f, w_f, k, cap, chunk=4)
        kl, gh, gw = head_kl(h_q.detach(), w_q.detach(), targets, cap, grad_dtype=torch.float64, chunk=4)
        lf, lq = torch.log_softmax(logits(h_f, w_f), -1), torch.log_softmax(logits(h_q, w_q), -1)
        top = lf.topk(k, -1).indices
        mask = torch.zeros_like(lf, dtype=torch.bool).scatter_(1, top, True)
        pf_tail = (lf.exp() * ~mask).sum(-1)
        q_tail = (lq.exp() * ~mask).sum(-1)
        direct = ((lf.exp() * (lf - lq) * mask).sum(-1) + torch.xlogy(pf_tail, pf_tail)
                  - pf_tail * q_tail.clamp_min(1e-300).log()).mean()
        ref_h, ref_w = torch.autograd.grad(direct, [h_q, w_q])
        assert kl == pytest.approx(direct.item(), rel=1e-10, abs=1e-14)
        torch.testing.assert_close(gh, ref_h, rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(gw, ref_w, rtol=1e-9, atol=1e-13)
        if k == 320:
            exact = (lf.exp() * (lf - lq)).sum(-1).mean()
            assert direct.item() == pytest.approx(exact.item(), rel=1e-12)


@pytest.mark.parametrize("table", [False, True])
def test_scale_and_zero_gradients_match_finite_differences(table):
    """The gradient of the calibration KL with respect to one group's scale offset ``a`` and zero offset ``b``
    (a layer's, and the tied table's, which is both the input embedding and the head), and to one norm gain
    (``norms``), through the whole model, against central finite differences in float64: relative difference
    below 1e-5."""
    model, tensors, windows = _setup()
    ids = windows[0]
    norm = "model.layers.1.post_attention_layernorm.weight"
    student = _Student(model, tensors, "all", {norm: dict(model.named_parameters())[norm]})
    for t in student.tuned.values():
        t.double()
    student.norms[norm].data = student.norms[norm].data.double()
    targets = teacher_targets(model.base_model(ids.unsqueeze(0)).last_hidden_state[0], student.head.weight, 320,
                              student.softcap)
    name = "model.embed_tokens.weight" if table else "model.layers.1.mlp.down_proj.weight"
    t = student.tuned[name]
    _kl_and_grads(student, ids, targets, torch.float64)
    row = int(ids[3]) if table else 5  # a table row that is both looked up and scored
    for param, at in ((t.a, (row, 1)), (t.b, (row, 1)), (student.norms[norm], (7,))):
        analytic = float(param.grad[at])
        eps = 1e-6
        with torch.no_grad():
            param[at] += eps
            up = _kl_only(student, ids, targets)
            param[at] -= 2 * eps
            down = _kl_only(student, ids, targets)
            param[at] += eps
        numeric = (up - down) / (2 * eps)
        assert abs(analytic) > 1e-8
        assert analytic == pytest.approx(numeric, rel=1e-5)


@torch.no_grad()
def _kl_only(student, ids, targets):
    weights = student.weights()
    return head_kl(student.hidden(weights, ids), student.head_weight(weights), targets, student.softcap,
                   grad_dtype=torch.float64)[0]


def test_tuning_lowers_kl_and_keeps_codes():
    """40 Adam steps on two windows lower the calibration KL by over 30% (KL measured on the stored, rounded
    scales); every tensor keeps its codes byte for byte, its scale dtype and its layout; scales moved."""
    model, tensors, windows = _setup(dtype=torch.float32)
    tuned, report = tune(model, tensors, windows, steps=40, lr=1e-2)
    assert report["kl_after"] < 0.7 * report["kl_before"]
    assert set(tuned) == set(tensors)
    moved = 0
    for name, qt in tensors.items():
        new = tuned[name]
        assert torch.equal(new.qweight, qt.qweight), name
        assert new.scales.dtype == qt.scales.dtype and new.zeros.dtype == qt.zeros.dtype
        assert (new.bits, new.group, new.shape) == (qt.bits, qt.group, qt.shape)
        moved += not torch.equal(new.scales, qt.scales)
    assert moved == len(tensors)


def test_norms_train_beside_scales_and_come_back_by_name():
    """``norms``: every 1-D float weight of the body (norm gains) is tuned and returned by name in its dtype, the
    quantized tensors as before; the stored result lowers the KL."""
    model, tensors, windows = _setup(dtype=torch.float32)
    floats = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 1}
    tuned, report = tune(model, tensors, windows, steps=20, lr=1e-2, norms=True)
    assert report["kl_after"] < report["kl_before"] and report["norms"] == len(floats) > 0
    assert set(tuned) == set(tensors) | set(floats)
    for name, before in floats.items():
        assert tuned[name].dtype == before.dtype and not torch.equal(tuned[name], before), name
        assert torch.equal(dict(model.named_parameters())[name], before), name  # the float model is untouched
    for name, qt in tensors.items():
        assert torch.equal(tuned[name].qweight, qt.qweight), name


def test_mixed_formats_tune_together():
    """A mixed-precision model (int8 per channel, int5 / int6 symmetric, int3 asymmetric side by side) tunes as one:
    lower KL, every code and format kept."""
    model, _, windows = _setup(dtype=torch.float32)
    specs = [Spec(8, 0, True), Spec(5, 32, True), Spec(6, 32, True), Spec(3, 32, False)]
    weights = [(n, p) for n, p in model.named_parameters() if n.endswith(".weight") and p.dim() == 2]
    tensors = {n: quantize(p.detach().float(), specs[i % len(specs)], "rtn", name=n) for i, (n, p) in enumerate(weights)}
    tuned, report = tune(model, tensors, windows, steps=20, lr=1e-2)
    assert report["kl_after"] < report["kl_before"]
    for name, qt in tensors.items():
        assert torch.equal(tuned[name].qweight, qt.qweight) and (tuned[name].bits, tuned[name].group) == (qt.bits, qt.group)
        assert (tuned[name].zeros is None) == (qt.zeros is None), name


@pytest.mark.parametrize("params", ["layers", "table"])
def test_params_selects_what_is_trained(params):
    """``params=layers`` leaves the vocabulary table's scales and zeros as they were, ``table`` the layers'."""
    model, tensors, windows = _setup(dtype=torch.float32)
    tuned, report = tune(model, tensors, windows, steps=5, lr=1e-2, params=params)
    assert report["kl_after"] < report["kl_before"]
    for name, qt in tensors.items():
        is_table = name == "model.embed_tokens.weight"
        frozen = is_table == (params == "layers")
        assert torch.equal(tuned[name].scales, qt.scales) == frozen, name
        assert torch.equal(tuned[name].zeros, qt.zeros) == frozen, name


def test_symmetric_tensors_train_scales_only():
    """A symmetric tensor has no zero to train: only ``a``; its stored tensor stays symmetric."""
    qt = quantize(torch.randn(8, 64) * 0.02, Spec(4, 32), "rtn")
    t = TunedTensor(qt)
    assert t.b is None and [p.shape for p in t.parameters()] == [(8, 2)]
    torch.testing.assert_close(t().detach(), qt.dequantize())
    assert t.stored().zeros is None


@pytest.mark.parametrize("bits, unit", [(2, 1.0), (4, 1.0), (5, 0.5), (8, 1 / 16)])
def test_scale_offsets_shrink_with_the_format_step(bits, unit):
    """A unit of ``a`` is a relative scale change of ``min(1, 2**(4 - bits))``: wider formats take finer steps."""
    qt = quantize(torch.randn(8, 64) * 0.02, Spec(bits, 32), "rtn")
    t = TunedTensor(qt)
    with torch.no_grad():
        t.a.fill_(0.5)
    torch.testing.assert_close(t.scales_zeros()[0], qt.scales.float() * (1 + 0.5 * unit))


def test_scheme_tune_key():
    """The preset resolves with every default; bad options, and tune on a float copy (method none), are
    one-line errors."""
    s = schemes.resolve("w4g128-gptq-tuned")
    assert s["tune"] == {"steps": 200, "lr": 1e-3, "tokens": 512, "params": "all", "topk": 1024,
                         "windows": "fresh", "norms": False, "round_lr": 0.0}
    assert s["gptq"]["table_damp"] == 0.1
    assert schemes.PRESETS["w4g128-gptq-tuned"]["tune"] == {}  # presets are not mutated
    assert schemes.resolve({"name": "x", "method": "rtn", "bits": 4, "tune": {"steps": 7}})["tune"]["steps"] == 7
    for bad, message in (({"steps": 0}, "tune.steps"), ({"lr": 2}, "tune.lr"), ({"params": "heads"}, "tune.params"),
                         ({"epochs": 3}, "keys among"), ({"topk": 1.5}, "tune.topk"),
                         ({"windows": "new"}, "tune.windows"), ({"norms": 1}, "tune.norms"),
                         ({"round_lr": -0.1}, "tune.round_lr"), ({"round_lr": True}, "tune.round_lr")):
        with pytest.raises(LlmoptError, match=message):
            schemes.resolve({"name": "x", "method": "gptq", "bits": 4, "tune": bad})
    assert schemes.resolve({"name": "x", "method": "mixed", "budget": {"bpw": 4}, "tune": {}})["tune"]["steps"] == 200
    with pytest.raises(LlmoptError, match="tune applies to quantized schemes"):
        schemes.resolve({"name": "x", "method": "none", "tune": {}})


def test_tune_windows_cycle_or_stay_fresh(reference_model_dir):
    """`windows: calibration` cycles GPTQ's calibration windows; `fresh` (the default) reads a new one every step."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reference_model_dir)
    base = {"name": "x", "method": "gptq", "bits": 4, "calibration": {"tokens": 64}}
    cycled = tune_windows(tok, schemes.resolve({**base, "tune": {"steps": 10, "tokens": 16, "windows": "calibration"}}))
    fresh = tune_windows(tok, schemes.resolve({**base, "tune": {"steps": 10, "tokens": 16}}))
    assert len(cycled) == 4 and len(fresh) == 10  # 64 calibration tokens make 4 windows, which the steps cycle
    assert all(torch.equal(a, b) for a, b in zip(cycled, fresh))  # the same text, from its start
    body = [w[1:].tolist() for w in fresh]  # without the BOS each window starts with
    assert all(len(b) == 16 for b in body) and len({tuple(b) for b in body}) == 10


def test_config_schema_accepts_the_tuned_scheme():
    import jsonschema
    import yaml
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    schema = yaml.safe_load((root / "workflow/schemas/config.schema.yaml").read_text())
    config = yaml.safe_load((root / "config/config.yaml").read_text())
    assert "tune" in config["schemes"]["w4g128-gptq-tuned"]
    jsonschema.validate(config, schema)
    config["schemes"]["w4g128-gptq-tuned"]["tune"]["params"] = "heads"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


def test_tune_needs_real_weights_and_memory(tmp_path):
    """A synthetic folder (no tokenizer) fails before any output; a model too large for this machine's memory is
    named with what it would need."""
    src = save_random(gemma3(), tmp_path / "src", 0)
    with pytest.raises(LlmoptError, match="needs real weights"):
        quantize_model(src, {"name": "t", "method": "rtn", "bits": 4, "group": 32, "tune": {}}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(LlmoptError, match=r"needs about .* GiB"):
        check_fits(10**13)


def test_rounding_offsets_get_the_weight_gradient_times_the_scale():
    """Learned rounding's straight-through gradient: ``dKL/dv`` of every weight is ``dKL/dW * s`` of its group
    (float64, every tensor, a layer's and the tied table's), and at ``v = 0`` the codes are GPTQ's (here rtn's)."""
    model, tensors, windows = _setup()
    student = _Student(model, tensors, "all", rounding=True)
    for t in student.tuned.values():
        t.double()
    ids = windows[0]
    targets = teacher_targets(model.base_model(ids.unsqueeze(0)).last_hidden_state[0], student.head.weight, 320,
                              student.softcap)
    weights = student.weights()
    for w in weights.values():
        w.retain_grad()
    h_q = student.hidden(weights, ids)
    w_q = student.head_weight(weights)
    _, gh, gw = head_kl(h_q.detach(), w_q.detach(), targets, student.softcap, grad_dtype=torch.float64)
    torch.autograd.backward([h_q, w_q], [gh, gw])
    for name, t in student.tuned.items():
        torch.testing.assert_close(t().detach(), tensors[name].dequantize(torch.float64), rtol=1e-6, atol=1e-9)
        expected = weights[name].grad.view(t.codes.shape) * t.scales_zeros()[0].unsqueeze(-1)
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(t.v.grad, expected, rtol=1e-12, atol=1e-15)


def test_learned_rounding_moves_codes_one_step_and_lowers_kl():
    """``round_lr``: codes move, each by at most one step and within the format's range; the stored tensor packs
    the moved codes (its dequantized weight is what was trained); the KL falls further than with the codes frozen;
    ``params=layers`` leaves the table's codes alone."""
    model, tensors, windows = _setup(dtype=torch.float32)
    _, frozen = tune(model, tensors, windows, steps=40, lr=1e-2)
    tuned, report = tune(model, tensors, windows, steps=40, lr=1e-2, round_lr=0.05)
    assert 0 < report["codes_moved"] < 0.5 and report["round_lr"] == 0.05
    assert report["kl_after"] < frozen["kl_after"]
    for name, qt in tensors.items():
        new = tuned[name]
        step = new.unpacked().int() - qt.unpacked().int()
        assert step.abs().max() <= 1, name
        assert (new.bits, new.group, new.shape, new.qweight.shape) == (qt.bits, qt.group, qt.shape, qt.qweight.shape)
    tuned, report = tune(model, tensors, windows, steps=5, lr=1e-2, params="layers", round_lr=0.2)
    table = "model.embed_tokens.weight"
    assert torch.equal(tuned[table].qweight, tensors[table].qweight) and report["codes_moved"] > 0
    with pytest.raises(LlmoptError, match="round_lr"):
        tune(model, tensors, windows, steps=1, round_lr=1.5)
