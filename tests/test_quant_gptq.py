"""GPTQ's option through the scheme key ``gptq: {damp}``: damping reaches the quantizer, and bad values are one-line
errors (the scheme resolver and the config schema)."""

from __future__ import annotations

import pytest
import torch

from llmopt.errors import LlmoptError
from llmopt.quant import schemes
from llmopt.quant.quantizers import Spec, group_params, quantize


def _inputs(n_in: int, seed: int = 0, tokens: int = 2048) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(n_in) + 0.3 * torch.randn(n_in, n_in, generator=gen) / n_in ** 0.5  # correlated channels
    scale = torch.exp(torch.randn(n_in, generator=gen))
    return (torch.randn(tokens, n_in, generator=gen) @ mix) * scale


def _weight(out: int, n_in: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, n_in, generator=torch.Generator().manual_seed(seed)) * 0.02


def _reference_gptq(w, h, spec, damp):
    """GPTQ as first written (OBQ's update, no lazy batches, no Cholesky), in float64: columns in act order, each
    one's error spread over the rest through the inverse of the damped Hessian, which then loses that column
    (Schur complement). Static groups from the same imatrix-weighted search as ours."""
    out, n_in = w.shape
    n_groups = n_in // spec.group
    s, z = group_params(w.view(out, n_groups, spec.group), spec, search=True,
                        weights=torch.diagonal(h).view(1, n_groups, spec.group))
    s, z = s.view(out, n_groups).double(), z.view(out, n_groups).double()
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    hd = h.double()[order][:, order]
    hinv = torch.linalg.inv(hd + damp * torch.diagonal(hd).mean() * torch.eye(n_in, dtype=torch.float64))
    W = w.double()[:, order].clone()
    codes = torch.empty(out, n_in, dtype=torch.long)
    for i in range(n_in):
        g = int(order[i]) // spec.group
        q = torch.clamp(torch.floor(W[:, i] / s[:, g] + z[:, g] + 0.5), 0, 2 ** spec.bits - 1)
        codes[:, int(order[i])] = q.long()
        e = (W[:, i] - (q - z[:, g]) * s[:, g]) / hinv[i, i]
        W[:, i + 1:] -= e.unsqueeze(1) * hinv[i, i + 1:].unsqueeze(0)
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return codes


def _codes(qt):
    from llmopt.quant.format import unpack_bits

    return unpack_bits(qt.qweight, qt.bits, qt.shape[1]).long()


@pytest.mark.parametrize("damp", [0.01, 0.1])
def test_gptq_damping_matches_reference(damp):
    """Our blocked Cholesky GPTQ at a given damping against the reference above: at most 1% of codes differ
    (float32 against float64 can move a value across a rounding boundary, and the error then propagates), and the
    two dampings give different codes, so the option reaches the quantizer."""
    spec = Spec(4, 32, False)
    w = _weight(32, 128, seed=5)
    h = (lambda x: x.T @ x)(_inputs(128, seed=6, tokens=160))  # few tokens: the damping matters
    ours = _codes(quantize(w, spec, "gptq", hessian=h, damp=damp))
    differ = (ours != _reference_gptq(w, h, spec, damp)).float().mean().item()
    assert differ <= 0.01, differ
    other = _codes(quantize(w, spec, "gptq", hessian=h, damp=0.5))
    assert (ours != other).float().mean().item() > 0.05


def test_scheme_gptq_key():
    assert schemes.resolve("w4g32-gptq")["gptq"] == {"damp": 0.01, "table_damp": 0.01}  # the default
    assert schemes.resolve("w4g128-gptq")["gptq"] == {"damp": 0.01, "table_damp": 0.1}  # measured better there
    s = schemes.resolve({"name": "w4g128-gptq", "gptq": {"damp": 0.03}})
    assert s["gptq"] == {"damp": 0.03, "table_damp": 0.03}  # the table follows damp unless given
    mixed = schemes.resolve({"name": "m", "method": "mixed", "budget": {"bpw": 5}, "base": "gptq", "gptq": {"damp": 0.1}})
    assert mixed["gptq"]["damp"] == 0.1
    assert "gptq" not in schemes.resolve("w4g128")


def test_vocabulary_table_gets_its_own_damping():
    from llmopt.quant.pipeline import _gptq_options

    s = schemes.resolve({"name": "w4g128-gptq", "gptq": {"damp": 0.01, "table_damp": 0.1}})
    assert _gptq_options(s, "model.embed_tokens.weight") == {"damp": 0.1}
    assert _gptq_options(s, "lm_head.weight") == {"damp": 0.1}
    assert _gptq_options(s, "model.layers.0.mlp.down_proj.weight") == {"damp": 0.01}
    assert _gptq_options(schemes.resolve("w4g128"), "model.embed_tokens.weight") == {}


@pytest.mark.parametrize("scheme, message", [
    ({"name": "w4g128-gptq", "gptq": {"damp": 0}}, r"gptq.damp 0 must be a number in \(0, 1\]"),
    ({"name": "w4g128-gptq", "gptq": {"damp": "a lot"}}, r"gptq.damp 'a lot' must be"),
    ({"name": "w4g128-gptq", "gptq": {"damp": 1.5}}, r"gptq.damp 1.5 must be a number in"),
    ({"name": "w4g128-gptq", "gptq": {"table_damp": 0}}, r"gptq.table_damp 0 must be a number in"),
    ({"name": "w4g128-gptq", "gptq": {"refits": 2}}, r"gptq must be \{damp\?, table_damp\?\}"),
    ({"name": "w4g128", "gptq": {"damp": 0.1}}, r"gptq options are set but the scheme does not use gptq"),
])
def test_bad_gptq_options(scheme, message):
    with pytest.raises(LlmoptError, match=message):
        schemes.resolve(scheme)


def test_config_schema_checks_gptq_options():
    import copy

    from llmopt.registry import DEFAULT_CONFIG, load, load_yaml

    cfg = copy.deepcopy(load_yaml(DEFAULT_CONFIG))
    cfg["schemes"]["w4g128-gptq"]["gptq"] = {"damp": 0.03}
    assert load(cfg).config["schemes"]["w4g128-gptq"]["gptq"] == {"damp": 0.03}
    for bad, message in (({"damp": 0}, r"gptq\.damp: 0 is less than or equal to the minimum"),
                         ({"damp": 2}, r"gptq\.damp: 2 is greater than the maximum"),
                         ({"order": "act"}, r"Additional properties are not allowed \('order'")):
        cfg["schemes"]["w4g128-gptq"]["gptq"] = bad
        with pytest.raises(LlmoptError, match=message):
            load(cfg)
