"""Scheme keys: the vocabulary tables' own format (`embedding`), the new presets, and their bad values."""

from __future__ import annotations

import copy

import pytest

from llmopt.errors import LlmoptError
from llmopt.quant import schemes
from llmopt.quant.io import load_folder
from llmopt.quant.pipeline import _format_bytes, _method_for, quantize_model
from llmopt.quant.quantizers import Spec
from llmopt.registry import DEFAULT_CONFIG, load, load_yaml
from test_quant_pipeline import make_model

VOCAB_TABLES = ("model.embed_tokens.weight", "lm_head.weight")


def test_presets_resolve_and_embedding_is_normalized():
    s = schemes.resolve("w4g128-gptq-emb8")
    assert (s["method"], s["bits"], s["group"], s["sym"]) == ("gptq", 4, 128, False)
    assert s["embedding"] == {"bits": 8, "group": 32, "sym": True}  # llama.cpp Q8_0's layout
    assert schemes.embedding_spec(s) == Spec(8, 32, True, "float16")
    assert schemes.embedding_spec(schemes.resolve("w4g128-gptq")) is None
    assert schemes.spec(schemes.resolve("w4g32")) == Spec(4, 32, True, "float16")  # llama.cpp Q4_0's layout
    assert schemes.spec(schemes.resolve("w8g32")) == Spec(8, 32, True, "float16")  # llama.cpp Q8_0's layout
    # group defaults like the scheme's own: per channel at 8 bits, 128 below
    s = schemes.resolve({"name": "x", "method": "rtn", "bits": 2, "group": 32, "embedding": {"bits": 4}})
    assert s["embedding"] == {"bits": 4, "group": 128, "sym": True}
    assert schemes.PRESETS["w4g128-gptq-emb8"]["embedding"] == {"bits": 8, "group": 32}  # presets are not mutated


def test_vocabulary_tables_are_named_not_sized():
    assert all(schemes.is_vocabulary_table(n) for n in VOCAB_TABLES)
    assert schemes.is_vocabulary_table("model.language_model.embed_tokens.weight")
    assert not schemes.is_vocabulary_table("model.vision_tower.embeddings.position_embedding.weight")
    assert not schemes.is_vocabulary_table("model.layers.0.mlp.up_proj.weight")
    # gptq runs on a vocabulary table only where it has a Hessian (a head, tied or not); an untied embedding is a
    # lookup with no input Hessian and gets the mse search
    with_head = {"hessians": {"model.embed_tokens.weight": None}}
    assert _method_for("gptq", "model.embed_tokens.weight", {}) == "mse"
    assert _method_for("gptq", "model.embed_tokens.weight", with_head) == "gptq"
    assert _method_for("gptq", "model.layers.0.mlp.up_proj.weight", {}) == "gptq"
    assert _method_for("rtn", "lm_head.weight", with_head) == "rtn"


@pytest.mark.parametrize("embedding, message", [
    ({"bits": 7}, r"embedding: bits 7 is not one of"),
    ({"bits": 8, "group": 12}, r"embedding: group 12 must be 0"),
    ({"bits": 8, "group": -8}, r"embedding: group -8 must be 0"),
    ({"bits": 4, "sym": "yes"}, r"embedding: sym must be true or false"),
    ({"group": 0}, r"embedding must be \{bits, group\?, sym\?\}"),
    ({"bits": 8, "method": "gptq"}, r"embedding must be \{bits, group\?, sym\?\}"),
    (8, r"embedding must be \{bits, group\?, sym\?\}"),
])
def test_bad_embedding_values(tmp_path, embedding, message):
    src = tmp_path / "src"
    make_model(src)
    with pytest.raises(LlmoptError, match=message) as err:
        quantize_model(src, {"name": "x", "method": "rtn", "bits": 4, "embedding": embedding}, tmp_path / "out", {})
    assert "\n" not in str(err.value)
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # nothing half-written


def test_embedding_with_method_none_is_an_error():
    with pytest.raises(LlmoptError, match="method 'none' quantizes nothing"):
        schemes.resolve({"name": "x", "method": "none", "embedding": {"bits": 8}})


def test_embedding_width_must_fit_its_group(tmp_path):
    src = tmp_path / "src"
    make_model(src)  # hidden 128: group 256 does not divide it
    with pytest.raises(LlmoptError, match=r"'(lm_head|model.embed_tokens).weight' \[384, 128\]: width 128 does not fit int4 group 256"):
        quantize_model(src, {"name": "x", "method": "rtn", "bits": 4, "embedding": {"bits": 4, "group": 256}},
                       tmp_path / "out", {})
    assert not (tmp_path / "out").exists()


def test_rtn_with_int8_vocabulary_tables(tmp_path):
    src = tmp_path / "src"
    tensors = make_model(src)
    scheme = {"name": "w4-emb8", "method": "rtn", "bits": 4, "group": 128, "embedding": {"bits": 8, "group": 0}}
    q = quantize_model(src, scheme, tmp_path / "out", {})
    plain = quantize_model(src, {"name": "w4", "method": "rtn", "bits": 4, "group": 128}, tmp_path / "plain", {})
    loaded = load_folder(tmp_path / "out")
    for name, t in tensors.items():
        if t.dim() != 2:
            continue
        qt, info = loaded[name], q["tensors"][name]
        if name in VOCAB_TABLES:
            assert (qt.bits, qt.group, qt.zeros is None, info["format"]) == (8, t.shape[1], True, "int8c")
            assert info["rel_error"] < 0.01  # int8 per channel of Gaussian rows: ~0.5%
            assert info["rel_error"] < plain["tensors"][name]["rel_error"] / 5
        else:  # the layers are exactly what the scheme without `embedding` gives
            assert (qt.bits, qt.group, info["format"]) == (4, 128, "int4g128")
            assert info["rel_error"] == plain["tensors"][name]["rel_error"]
        assert info["bytes"] == qt.nbytes == _format_bytes(Spec(qt.bits, qt.group, qt.zeros is None), tuple(t.shape))
    extra = sum(q["tensors"][n]["bytes"] - plain["tensors"][n]["bytes"] for n in VOCAB_TABLES)
    assert q["bytes"] - plain["bytes"] == extra > 0


def test_mixed_keeps_vocabulary_tables_fixed(tmp_path):
    src = tmp_path / "src"
    make_model(src)
    scheme = {"name": "m", "method": "mixed", "budget": {"bpw": 5.5}, "base": "rtn", "embedding": {"bits": 8}}
    q = quantize_model(src, scheme, tmp_path / "out", {})
    assert all(q["tensors"][n]["format"] == "int8c" and "loss" not in q["tensors"][n] for n in VOCAB_TABLES)
    others = [t for n, t in q["tensors"].items() if "bits" in t and n not in VOCAB_TABLES]
    assert all("loss" in t for t in others)
    assert q["bytes"] == q["budget"]["used_bytes"] <= q["budget"]["bytes"]
    assert q["budget"]["formats"]["int8c"] >= 2 and sum(q["budget"]["formats"].values()) == len(others) + 2
    # the pinned tables take bytes the knapsack then lacks: the other tensors get fewer bits than without the pin
    free = quantize_model(src, {k: v for k, v in scheme.items() if k != "embedding"}, tmp_path / "free", {})

    def mean_bits(report):
        return sum(t["bits"] for n, t in report["tensors"].items() if "bits" in t and n not in VOCAB_TABLES) / len(others)

    assert mean_bits(q) < mean_bits(free)


def test_mixed_floor_counts_the_pinned_tables(tmp_path):
    src = tmp_path / "src"
    make_model(src)
    # int8 vocabulary tables (37% of this toy's parameters) + every other tensor at int2 g128: 4.48 bpw
    with pytest.raises(LlmoptError, match=r"below the floor \d+ bytes \(4\.48"):
        quantize_model(src, {"name": "m", "method": "mixed", "budget": {"bpw": 4.4}, "base": "rtn",
                             "embedding": {"bits": 8}}, tmp_path / "out", {})
    assert not (tmp_path / "out").exists()


def test_config_schema_checks_embedding():
    cfg = copy.deepcopy(load_yaml(DEFAULT_CONFIG))
    assert load(cfg).config["schemes"]["w4g128-gptq-emb8"]["embedding"] == {"bits": 8, "group": 32}
    schemes.resolve({"name": "w4g128-gptq-emb8", **cfg["schemes"]["w4g128-gptq-emb8"]})
    for bad, message in (({"bits": 7}, r"embedding\.bits: 7 is not one of"),
                         ({"group": 0}, r"'bits' is a required property"),
                         ({"bits": 8, "colour": 1}, r"Additional properties are not allowed \('colour'")):
        cfg["schemes"]["w4g128-gptq-emb8"]["embedding"] = bad
        with pytest.raises(LlmoptError, match=message):
            load(cfg)
