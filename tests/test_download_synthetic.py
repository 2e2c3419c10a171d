"""Synthetic weights: every family at tiny scale loads in transformers' own classes, keeps its features, runs,
and is byte-identical on a rerun; shards and the streaming writer hold their promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llmopt.download.synthetic import build_config, write_synthetic
from llmopt.errors import LlmoptError
from llmopt.fsutil import read_json
from llmopt.registry import load

REG = load()
SYNTHETIC = [mid for mid, e in REG.all_models.items() if e["source"] == "hub"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {mid: (root / mid, write_synthetic(mid, REG.model(mid), root / mid, "tiny")) for mid in SYNTHETIC}


def hf_model(folder):
    import transformers

    cfg = read_json(folder / "config.json")
    return getattr(transformers, cfg["architectures"][0]).from_pretrained(folder, dtype=torch.float32)


@pytest.mark.parametrize("model_id", SYNTHETIC)
def test_tiny_loads_in_transformers_and_runs(tiny_dirs, model_id):
    from transformers import AutoTokenizer

    folder, manifest = tiny_dirs[model_id]
    model = hf_model(folder)  # from_pretrained raises on missing tensors / wrong shapes
    assert sum(p.numel() for p in model.parameters()) == manifest["provenance"]["parameters"]
    tok = AutoTokenizer.from_pretrained(folder)
    text = "Once more unto the breach, dear friends — once more!"  # 50+ tokens: longer than the 16-token windows
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0], skip_special_tokens=True) == text
    assert ids.shape[1] > 50
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == 512 and torch.isfinite(logits).all() and logits.std() > 0
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "hi" in chat and ("<start_of_turn>model" in chat or "<|im_start|>assistant" in chat)
    assert manifest["source"] == "synthetic" and manifest["scale"] == "tiny"


@pytest.mark.parametrize("model_id", SYNTHETIC)
def test_tiny_keeps_family_features(model_id):
    """GQA ratio, windows, softcaps, layer patterns, M-RoPE sections, vision tower survive the shrinking."""
    entry = REG.model(model_id)
    full, tiny = build_config(entry, "full"), build_config(entry, "tiny")
    ft, tt = getattr(full, "text_config", full), getattr(tiny, "text_config", tiny)
    assert ft.num_attention_heads // ft.num_key_value_heads == tt.num_attention_heads // tt.num_key_value_heads
    assert tt.num_key_value_heads >= 2 or ft.num_key_value_heads == 1  # several kv heads exercise GQA indexing
    assert tt.hidden_size % 128 == 0 and tt.intermediate_size % 128 == 0  # group-128 quantization fits
    head_dim = getattr(tt, "head_dim", None) or tt.hidden_size // tt.num_attention_heads
    assert tt.num_attention_heads * head_dim % 128 == 0
    family = entry["family"]
    if family in ("gemma2", "gemma3"):
        assert set(tt.layer_types) == {"sliding_attention", "full_attention"}
        assert tt.layer_types.count("full_attention") >= 1 and tt.sliding_window < 32
        assert tt.query_pre_attn_scalar == ft.query_pre_attn_scalar * tt.head_dim // ft.head_dim or \
            tt.query_pre_attn_scalar == tt.hidden_size // tt.num_attention_heads
    if family == "gemma2":
        assert (tt.attn_logit_softcapping, tt.final_logit_softcapping) == (50.0, 30.0)
    if family == "gemma3":
        assert tt.layer_types[5] == "full_attention" and tt.layer_types[:5] == ["sliding_attention"] * 5
        assert tt.rope_parameters["full_attention"]["rope_type"] == "linear"
    if family == "qwen2_5_vl":
        sections = tt.rope_parameters["mrope_section"]
        assert len(sections) == 3 and sum(sections) == head_dim // 2
        assert tiny.vision_config.depth >= 2 and tiny.vision_config.out_hidden_size == tt.hidden_size
        assert tiny.vision_config.fullatt_block_indexes and tiny.image_token_id < tt.vocab_size
    if model_id == "qwq-32b-preview":
        assert tt.rms_norm_eps == 1e-5


def test_vl_tiny_runs_an_image(tiny_dirs):
    """Qwen2.5-VL tiny: a text + image prompt goes through the vision tower and the merger."""
    folder, _ = tiny_dirs["qwen2.5-vl-7b-instruct"]
    model = hf_model(folder)
    cfg = model.config
    patch = cfg.vision_config.patch_size
    grid = torch.tensor([[1, 4, 4]])  # t, h, w in patches -> 16 patches -> 4 tokens after the 2x2 merge
    pixels = torch.randn(16, 3 * cfg.vision_config.temporal_patch_size * patch * patch)
    ids = torch.tensor([[5, 6, cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id, 7]])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits
    assert out.shape == (1, ids.shape[1], 512) and torch.isfinite(out).all()


def test_rerun_is_byte_identical_and_seed_matters(tmp_path, tiny_dirs):
    folder, first = tiny_dirs["gemma-2-2b-it"]
    again = write_synthetic("gemma-2-2b-it", REG.model("gemma-2-2b-it"), tmp_path / "again", "tiny")
    assert again["files"] == first["files"]
    other = write_synthetic("gemma-2-2b-it", REG.model("gemma-2-2b-it"), tmp_path / "seed1", "tiny", seed=1)
    assert other["files"]["model.safetensors"] != first["files"]["model.safetensors"]


def test_init_statistics(tiny_dirs):
    """Linear weights ~N(0, 0.02); Qwen norms near 1, Gemma norms (used as 1 + w) near 0."""
    from safetensors.torch import load_file

    qwen = load_file(tiny_dirs["qwen2.5-7b-instruct"][0] / "model.safetensors")
    gemma = load_file(tiny_dirs["gemma-2-9b-it"][0] / "model.safetensors")
    w = qwen["model.layers.0.mlp.up_proj.weight"].float()
    assert abs(w.mean()) < 1e-3 and abs(w.std() - 0.02) < 1e-3
    assert abs(qwen["model.norm.weight"].float().mean() - 1) < 0.01
    assert abs(gemma["model.norm.weight"].float().mean()) < 0.01
    assert "lm_head.weight" not in gemma and "lm_head.weight" in qwen  # tied vs untied
    vl = load_file(tiny_dirs["qwen2.5-vl-7b-instruct"][0] / "model.safetensors")
    assert any(k.startswith("visual.blocks.") for k in vl) and "model.layers.0.self_attn.q_proj.bias" in vl


def test_sharded_equals_single_file(tmp_path, tiny_dirs):
    entry = REG.model("qwen2.5-14b-instruct")
    manifest = write_synthetic("qwen2.5-14b-instruct", entry, tmp_path / "sharded", "tiny", shard_bytes=1 << 20)
    shards = [n for n in manifest["files"] if n.endswith(".safetensors")]
    assert len(shards) > 2 and all(n.startswith("model-000") for n in shards)
    index = read_json(tmp_path / "sharded" / "model.safetensors.index.json")
    assert set(index["weight_map"].values()) == set(shards)
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        a = hf_model(tmp_path / "sharded")(ids).logits
        b = hf_model(tiny_dirs["qwen2.5-14b-instruct"][0])(ids).logits
    assert torch.equal(a, b)


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    import llmopt.download.synthetic as synthetic

    real = synthetic.chunk_bytes

    def broken(name, index, count, mean, std, seed):
        if name.endswith("layers.1.mlp.up_proj.weight"):
            raise LlmoptError("disk full (simulated)")
        return real(name, index, count, mean, std, seed)

    monkeypatch.setattr(synthetic, "chunk_bytes", broken)
    with pytest.raises(LlmoptError, match="simulated"):
        write_synthetic("gemma-2-2b-it", REG.model("gemma-2-2b-it"), tmp_path / "out", "tiny")
    assert list(tmp_path.iterdir()) == []


def test_bad_entries():
    entry = REG.model("gemma-2-2b-it")
    with pytest.raises(LlmoptError, match="scale 'huge'"):
        build_config(entry, "huge")
    with pytest.raises(LlmoptError, match="family 'llama'"):
        build_config({**entry, "family": "llama"}, "tiny")
    with pytest.raises(LlmoptError, match="no 'tiny' block"):
        build_config({k: v for k, v in entry.items() if k != "tiny"}, "tiny")


def test_full_scale_streams_with_low_peak_memory(tmp_path):
    """Full-scale Gemma 3 270M shapes (536 MB of bf16) written with ~constant memory: peak RSS grows < 150 MB."""
    code = f"""
import json, resource, sys
from pathlib import Path
from llmopt.download.synthetic import write_synthetic, build_config, tensor_specs
from llmopt.registry import load
entry = load().model("gemma-3-270m")
tensor_specs(build_config(entry, "full"))  # import and build everything once before measuring
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = write_synthetic("gemma-3-270m", entry, Path(sys.argv[1]), "full", shard_bytes=200 << 20)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"grow_kb": after - before, "files": sorted(m["files"])}}))
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "full")], capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["grow_kb"] < 150 * 1024, result
    assert "model.safetensors.index.json" in result["files"] and len(result["files"]) >= 4
    from safetensors import safe_open

    shard = read_json(tmp_path / "full" / "model.safetensors.index.json")["weight_map"]["model.embed_tokens.weight"]
    with safe_open(tmp_path / "full" / shard, "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    assert emb.shape == (262144, 640) and emb.dtype == torch.bfloat16
