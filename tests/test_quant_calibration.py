"""Calibration statistics on a small random HF model: input Hessians (head matmul skipped) against a direct
computation, and the Fisher diagonal against autograd on a single window; calibration windows drawn from every
text in turn (real tokenizer and texts)."""

from __future__ import annotations

import pytest
import torch

from llmopt.errors import LlmoptError
from llmopt.quant.calibration import _spread, calibration_windows, fisher_diagonal, input_hessians


def tiny_model(tied: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_input_hessians_match_direct_computation(tied):
    model = tiny_model(tied)
    windows = [torch.randint(0, 96, (n,)) for n in (17, 9)]
    h = input_hessians(model, windows)
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert head in h and ("lm_head.weight" in h) == (not tied)
    assert all(not mod._forward_pre_hooks for mod in model.modules())  # hooks removed
    want_head = torch.zeros(32, 32, dtype=torch.float64)
    want_q0 = torch.zeros(32, 32, dtype=torch.float64)
    with torch.no_grad():
        for ids in windows:
            final = model.model(ids.unsqueeze(0)).last_hidden_state[0].double()  # the head's input (after the norm)
            x0 = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)).double()  # q_proj's input
            want_head += final.T @ final
            want_q0 += x0.T @ x0
    # float32 sums of 26 outer products: tolerance relative to the largest entry
    assert torch.allclose(h[head].double(), want_head, atol=1e-4 * float(want_head.abs().max()))
    q0 = h["model.layers.0.self_attn.q_proj.weight"].double()
    assert torch.allclose(q0, want_q0, atol=1e-4 * float(want_q0.abs().max()))
    # k_proj and v_proj read the same input as q_proj
    assert torch.equal(h["model.layers.0.self_attn.k_proj.weight"], h["model.layers.0.self_attn.q_proj.weight"])
    # the model still runs normally afterwards (the early exit left no state behind)
    assert model(windows[0].unsqueeze(0)).logits.shape == (1, 17, 96)


def test_fisher_diagonal_is_squared_gradient():
    model = tiny_model(tied=True)
    ids = torch.randint(0, 96, (13,))
    fisher = fisher_diagonal(model, [ids])
    weight = model.model.layers[1].mlp.down_proj.weight
    weight.requires_grad_(True)
    logits = model(ids.unsqueeze(0)).logits[0, :-1]
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, ids[1:]), [weight])
    weight.requires_grad_(False)
    assert torch.allclose(fisher["model.layers.1.mlp.down_proj.weight"], grad.square(), rtol=1e-4, atol=1e-12)
    assert set(fisher) == {n for n, p in model.named_parameters() if p.dim() == 2}


def test_tied_head_is_quantized_by_gptq_on_its_hessian():
    """The tied table gets GPTQ with the head's Hessian (final-norm hidden states), and that beats the imatrix mse
    search on the head's output error over the same calibration inputs, computed directly (a random tiny model
    has a near-isotropic Hessian, hence the small margin; docs/benchmarks.md has the real model's perplexity)."""
    from llmopt.quant.pipeline import _method_for
    from llmopt.quant.quantizers import Spec, quantize

    model = tiny_model(tied=True)
    windows = [torch.randint(0, 96, (n,)) for n in (40, 40, 40)]
    h = input_hessians(model, windows)
    name = "model.embed_tokens.weight"
    assert _method_for("gptq", name, {"hessians": h}) == "gptq"
    with torch.no_grad():
        x = torch.cat([model.model(ids.unsqueeze(0)).last_hidden_state[0] for ids in windows])
    table = model.model.embed_tokens.weight.detach()
    spec = Spec(3, 16, sym=False)
    errors = {}
    for method in ("gptq", "mse"):
        deq = quantize(table, spec, method, hessian=h[name], importance=torch.diagonal(h[name])).dequantize()
        errors[method] = float((x @ (table - deq).T).norm() / (x @ table.T).norm())
    assert errors["gptq"] < 0.95 * errors["mse"], errors  # 0.098 vs 0.109 here (seeded)


def test_spread_order_visits_every_item_once_and_halves_first():
    for n in range(1, 40):
        order = _spread(list(range(n)))
        assert sorted(order) == list(range(n))
    assert _spread(list(range(8))) == [0, 4, 2, 6, 1, 5, 3, 7]
    assert _spread(list(range(6)))[:3] == [0, 4, 2]  # start, middle, quarter, even when n is no power of two


def test_calibration_windows_take_every_text_in_turn(reference_model_dir):
    """A budget of one window a text gives each text's opening; the next turn each text's middle window; the
    budget is met exactly, windows never overlap, and an evaluation text is refused."""
    from transformers import AutoTokenizer

    from llmopt.quant.texts import load_text

    tok = AutoTokenizer.from_pretrained(reference_model_dir)
    texts, w = ["macbeth", "emma", "othello"], 64
    ids = {t: tok(load_text(t), add_special_tokens=False)["input_ids"] for t in texts}
    first = calibration_windows(tok, texts, 3 * w, window=w)
    assert [x[1:].tolist() for x in first] == [ids[t][:w] for t in texts]
    assert all(int(x[0]) == tok.bos_token_id for x in first)
    more = calibration_windows(tok, texts, 6 * w + 10, window=w)
    assert sum(len(x) - 1 for x in more) == 6 * w + 10 and [len(x) - 1 for x in more][-1] == 10
    for i, t in enumerate(texts):
        n = -(-len(ids[t]) // w)
        middle = 2 ** ((n - 1).bit_length() - 1)  # the first index of the second turn in bit-reversed order
        assert more[3 + i][1:].tolist() == ids[t][middle * w:(middle + 1) * w]
    assert more[6][1:].tolist() == ids["macbeth"][2 ** ((-(-len(ids["macbeth"]) // w) - 1).bit_length() - 2) * w:][:10]
    with pytest.raises(LlmoptError, match="also evaluation texts"):
        calibration_windows(tok, ["macbeth", "hamlet"], w)
