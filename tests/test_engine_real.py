"""The real Gemma 3 270M (from the pip GGUF, fixture ``reference_model_dir``) against Hugging Face transformers.

- float32 logits of a prompt longer than nothing trivial match HF within 1e-3 absolute (logits reach ~25);
- greedy continuation: 32 new tokens identical to ``transformers.generate`` token for token;
- int4 (RTN group 128, symmetric): the int4pack path agrees with its own dequantized float32 reference within 1e-3
  relative with float32 kernel input and 2e-2 with the default bf16 input (same top-1 token at >= 90% of positions).
"""

from __future__ import annotations

import pytest
import torch

from llmopt.backends import get_backend
from llmopt.engine import load_model

pytestmark = pytest.mark.real_model
PROMPT = "The history of the city of Rome begins"


@pytest.fixture(scope="module")
def hf_and_ours(reference_model_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(reference_model_dir, dtype=torch.float32).eval()
    return hf, load_model(reference_model_dir)


def test_logits_match_hf(hf_and_ours):
    hf, model = hf_and_ours
    ids = model.tokenizer.encode(PROMPT + " with a story told by Livy, and the story is long.")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits
    got = model.forward_logits([ids])
    assert (got - ref).abs().max() < 1e-3


def test_greedy_32_tokens_match_hf_generate(hf_and_ours):
    hf, model = hf_and_ours
    ids = model.tokenizer.encode(PROMPT)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    ours = model.generate(PROMPT, max_new_tokens=32)
    assert len(ours.tokens[0]) == 32
    assert ours.tokens[0] == ref
    assert ours.texts[0] == model.tokenizer.decode(ref)


def test_int4_fast_path_matches_its_reference(reference_model_dir, tmp_path):
    import shutil

    from llmopt.quant.format import load_packed, save_packed
    from llmopt.quant.quantizers import Spec, quantize

    tensors = load_packed(reference_model_dir / "model.safetensors")
    packed = {n: quantize(t.float(), Spec(4, 128), "rtn", name=n) if t.dim() == 2 else t for n, t in tensors.items()}
    save_packed(tmp_path / "model.safetensors", packed)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(reference_model_dir / f, tmp_path / f)
    fast = load_model(tmp_path)
    exact = load_model(tmp_path, backend=get_backend("cpu", kernel_dtype="float32"))
    ref = load_model(tmp_path, backend=get_backend("cpu", quant="reference"))
    ids = [fast.tokenizer.encode(PROMPT)]
    a, b = fast.forward_logits(ids), ref.forward_logits(ids)
    assert fast.backends["cpu"].kinds["int4pack"] == 18 * 7 + 1  # every linear and the tied head
    assert (exact.forward_logits(ids) - b).abs().max() <= 1e-3 * b.abs().max()  # float32 kernel input
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()  # default bf16 kernel input
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
