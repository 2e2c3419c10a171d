"""Bad input gives one-line LlmoptErrors naming what is wrong; config parsing of v4 and v5 layouts; sampling,
streaming, stop tokens and partition plans on a tiny random Qwen2 model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmopt.backends import get_backend
from llmopt.engine import ModelArgs, load_model
from llmopt.engine.sampling import Sampler
from llmopt.errors import LlmoptError
from llmopt.quant.format import load_packed, save_packed


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=40, tie_word_embeddings=False, eos_token_id=127)
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return load_model(folder)


def edited_copy(folder, tmp_path, config_edit=None, tensor_edit=None):
    dst = tmp_path / "m"
    shutil.copytree(folder, dst)
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensor_edit:
        tensors = load_packed(dst / "model.safetensors")
        tensor_edit(tensors)
        save_packed(dst / "model.safetensors", tensors)
    return dst


def one_line(err):
    assert "\n" not in str(err.value)
    return str(err.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(LlmoptError, match="no config.json") as err:
        load_model(tmp_path)
    one_line(err)
    with pytest.raises(LlmoptError, match="directory not found"):
        load_model(tmp_path / "nope")


def test_unsupported_architecture(folder, tmp_path):
    dst = edited_copy(folder, tmp_path, config_edit=lambda c: c.update(model_type="llama"))
    with pytest.raises(LlmoptError, match="model_type 'llama' is not supported") as err:
        load_model(dst)
    assert str(dst) in one_line(err)


def test_missing_tensor(folder, tmp_path):
    dst = edited_copy(folder, tmp_path, tensor_edit=lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(LlmoptError, match=r"'layers.2.mlp.up_proj.weight' is missing \(expected shape \[64, 32\]\)"):
        load_model(dst)


def test_wrong_shape(folder, tmp_path):
    def shrink(t):
        t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][:8]

    dst = edited_copy(folder, tmp_path, tensor_edit=shrink)
    with pytest.raises(LlmoptError, match=r"'layers.1.self_attn.k_proj.weight' has shape \[8, 32\], expected \[16, 32\]"):
        load_model(dst)


def test_no_safetensors(folder, tmp_path):
    dst = tmp_path / "cfg-only"
    dst.mkdir()
    shutil.copy(folder / "config.json", dst)
    with pytest.raises(LlmoptError, match="no model.safetensors"):
        load_model(dst)


def test_prompt_longer_than_context(model):
    with pytest.raises(LlmoptError, match="longer than the model context of 40"):
        model.forward_logits(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(LlmoptError, match="exceeds the model context of 40"):
        model.generate(list(range(1, 30)), max_new_tokens=20)


def test_image_for_text_only_model(model, tmp_path):
    with pytest.raises(LlmoptError, match="takes no images"):
        model.generate([1, 2, 3], images=[tmp_path / "x.png"])


def test_bad_token_ids_and_text_without_tokenizer(model):
    with pytest.raises(LlmoptError, match="token ids must lie in 0..127"):
        model.forward_logits([[1, 500]])
    with pytest.raises(LlmoptError, match="no tokenizer.json"):
        model.generate("hello")


def test_bad_plans(folder):
    for plan, msg in [({"segments": []}, "non-empty"), ({"segments": [{"layers": [0, 2], "device": "cpu"}]}, "layer 3 has no device"),
                      ({"segments": [{"layers": [0, 9], "device": "cpu"}]}, "outside"),
                      ({"segments": [{"layers": [0, 3], "device": "tpu"}]}, "unknown target 'tpu'")]:
        with pytest.raises(LlmoptError, match=msg):
            load_model(folder, plan=plan)


def test_partition_across_backends_equals_single(folder, model):
    """Layers 0-1 on one backend instance, 2-3 and the head on another: activations cross via the host."""
    plan = {"segments": [{"layers": [0, 1], "device": "cpu"}, {"layers": [2, 3], "device": "cpu-b"}],
            "embedding": "cpu", "head": "cpu-b"}
    split = load_model(folder, plan=plan, backends={"cpu-b": get_backend("cpu", quant="reference")})
    assert split.layer_dev == ["cpu", "cpu", "cpu-b", "cpu-b"]
    ids = torch.randint(0, 128, (2, 9))
    assert torch.allclose(split.forward_logits(ids), model.forward_logits(ids), atol=1e-5)
    assert split.generate(ids[0].tolist(), max_new_tokens=6).tokens == model.generate(ids[0].tolist(), max_new_tokens=6).tokens


def test_stop_tokens_and_streaming(model):
    streamed = []
    first = model.generate([5, 6, 7], max_new_tokens=10, stop_ids=[], stream=lambda i, t, s: streamed.append(t))
    assert streamed == first.tokens[0] and len(streamed) == 10 and first.finish == ["length"]
    stop = first.tokens[0][3]
    out = model.generate([5, 6, 7], max_new_tokens=10, stop_ids=[stop])
    k = first.tokens[0].index(stop)
    assert out.tokens[0] == first.tokens[0][:k] and out.finish == ["stop"]


def test_sampling_is_seeded_and_restricted(model):
    a = model.generate([5, 6, 7], max_new_tokens=8, temperature=1.0, seed=3, stop_ids=[])
    b = model.generate([5, 6, 7], max_new_tokens=8, temperature=1.0, seed=3, stop_ids=[])
    greedy = model.generate([5, 6, 7], max_new_tokens=8, stop_ids=[])
    assert a.tokens == b.tokens
    assert model.generate([5, 6, 7], max_new_tokens=8, temperature=2.0, top_k=1, seed=9, stop_ids=[]).tokens == greedy.tokens


def test_sampler_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    probs = Sampler(1.0, top_k=3).probs(logits)
    assert probs[0, 3:].sum() == 0 and torch.isclose(probs.sum(), torch.tensor(1.0))
    p = torch.softmax(logits, -1)[0]
    top_p = Sampler(1.0, top_p=float(p[0] + 0.01)).probs(logits)  # needs the two most likely tokens
    assert (top_p[0] > 0).tolist() == [True, True, False, False, False]
    draws = torch.stack([Sampler(0.5, seed=s)(logits) for s in range(200)])
    assert (draws == 0).float().mean() > 0.8  # temperature 0.5 sharpens towards the argmax (p=0.86)
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(LlmoptError):
            Sampler(**{"temperature": 1.0, **bad})


def test_config_v4_layouts():
    """Hub checkpoints carry the transformers-4 keys; they parse to the same ModelArgs as the v5 layout."""
    gemma3_v4 = {"model_type": "gemma3", "text_config": {
        "model_type": "gemma3_text", "hidden_size": 5376, "num_hidden_layers": 62, "num_attention_heads": 32,
        "num_key_value_heads": 16, "head_dim": 128, "intermediate_size": 21504, "vocab_size": 262208,
        "query_pre_attn_scalar": 168, "sliding_window": 1024, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"}}, "eos_token_id": [1, 106]}
    a = ModelArgs.from_hf(gemma3_v4)
    assert a.family == "gemma3" and a.tie_embeddings and a.qk_norm and a.eos_token_ids == (1, 106)
    assert a.windows[5] is None and a.windows[0] == 1024 and sum(w is None for w in a.windows) == 10
    assert a.rope_layers[5].theta == 1e6 and a.rope_layers[5].factor == 8.0
    assert a.rope_layers[0].theta == 1e4 and a.rope_layers[0].factor == 1.0
    assert a.attn_scale == 168 ** -0.5
    vl_v4 = {"model_type": "qwen2_5_vl", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064, "rope_theta": 1e6,
             "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": False,
             "image_token_id": 151655, "vision_config": {"depth": 32, "hidden_size": 1280, "num_heads": 16,
                                                         "intermediate_size": 3420, "out_hidden_size": 3584}}
    v = ModelArgs.from_hf(vl_v4)
    assert v.mrope and v.rope_layers[0].mrope_section == (16, 24, 24) and v.rope_layers[0].theta == 1e6
    assert v.vision.fullatt_blocks == (7, 15, 23, 31) and v.head_dim == 128 and v.qkv_bias
    for bad, msg in [({"model_type": "qwen2"}, "missing field 'hidden_size'"),
                     ({**vl_v4, "rope_scaling": {"type": "yarn", "factor": 4}}, "rope_type 'yarn'"),
                     ({**vl_v4, "num_key_value_heads": 5}, "not a multiple")]:
        with pytest.raises(LlmoptError, match=msg):
            ModelArgs.from_hf(bad)
