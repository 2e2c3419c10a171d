"""Registry: config/config.yaml, models.yaml, targets.yaml load and validate; bad files fail in one line."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from llmopt.errors import LlmoptError
from llmopt.registry import DEFAULT_CONFIG, REPO, load, load_models, load_yaml, rule_safe

FACTS = {  # FACTS §1: (hidden, layers, heads, kv heads, head dim, FFN, vocab, tied)
    "gemma-3-27b-it": (5376, 62, 32, 16, 128, 21504, 262208, True),
    "qwen2.5-7b-instruct": (3584, 28, 28, 4, 128, 18944, 152064, False),
    "gemma-2-9b-it": (3584, 42, 16, 8, 256, 14336, 256000, True),
    "qwen2.5-vl-7b-instruct": (3584, 28, 28, 4, 128, 18944, 152064, False),
    "gemma-2-2b-it": (2304, 26, 8, 4, 256, 9216, 256000, True),
    "qwen2.5-14b-instruct": (5120, 48, 40, 8, 128, 13824, 152064, False),
    "qwen2.5-32b-instruct": (5120, 64, 40, 8, 128, 27648, 152064, False),
    "qwq-32b-preview": (5120, 64, 40, 8, 128, 27648, 152064, False),
}


def default_config() -> dict:
    return load_yaml(DEFAULT_CONFIG)


def test_default_config_covers_eight_seed_models_and_the_reference():
    reg = load()
    assert list(reg.models)[:8] == list(FACTS)
    assert "gemma-3-270m" in reg.models and reg.models["gemma-3-270m"]["source"] == "pip-gguf"
    assert reg.config["scale"] == "tiny"
    assert set(reg.targets) == {"cpu", "vulkan", "npu", "iree-cpu", "cuda"}
    assert reg.schemes["w4g128"] == {"name": "w4g128", "method": "rtn", "bits": 4, "group": 128, "sym": True,
                                     "scale_dtype": "float16", "perplexity": {"texts": ["hamlet"], "tokens": 2048}}
    assert {"w4g128", "w8", "seed-size"} <= set(reg.config["schemes"])
    assert all(entry["id"] == mid for mid, entry in reg.all_models.items())


@pytest.mark.parametrize("model_id", list(FACTS))
def test_models_yaml_matches_facts(model_id):
    entry = load().model(model_id)
    from llmopt.download.synthetic import build_config

    cfg = build_config(entry, "full")
    text = getattr(cfg, "text_config", cfg)
    hidden, layers, heads, kv, head_dim, ffn, vocab, tied = FACTS[model_id]
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        hidden, layers, heads, kv)
    assert (getattr(text, "head_dim", None) or hidden // heads) == head_dim
    assert (text.intermediate_size, text.vocab_size) == (ffn, vocab)
    assert bool(cfg.tie_word_embeddings) == tied
    seed = entry["seed"]
    assert seed["tok_s"][0] < seed["tok_s"][1] and 0 < seed["size_gb"] < seed["original_size_gb"]


def test_params_full_equals_the_meta_model_count():
    """params_full in models.yaml is what the stages read; it must equal transformers' own model's count."""
    import numpy as np

    from llmopt.download.synthetic import build_config, tensor_specs

    for mid, entry in load().all_models.items():
        count = sum(int(np.prod(shape)) for _, shape in tensor_specs(build_config(entry, "full")))
        assert entry["params_full"] == count, mid


def test_rule_safe():
    assert rule_safe("qwen2.5-7b-instruct") == "qwen2_5_7b_instruct"
    assert rule_safe("gemma-3-270m") == "gemma_3_270m"


def test_unknown_model_id():
    with pytest.raises(LlmoptError, match=r"unknown model id 'gpt-5'"):
        load().model("gpt-5")
    cfg = default_config()
    cfg["models"] = ["gemma-2-2b-it", "gpt-5"]
    with pytest.raises(LlmoptError, match=r"config: models: unknown model 'gpt-5' \(expected one of gemma-3-27b-it"):
        load(cfg)


def test_unknown_target_and_scheme():
    cfg = default_config()
    cfg["targets"] = ["cpu", "tpu"]
    with pytest.raises(LlmoptError, match=r"targets: unknown target 'tpu'"):
        load(cfg)
    cfg = default_config()
    cfg["run_schemes"] = ["w3"]
    with pytest.raises(LlmoptError, match=r"run_schemes: unknown scheme 'w3'"):
        load(cfg)


@pytest.mark.parametrize("mutate, field", [
    (lambda c: c.update(scale="huge"), r"scale: 'huge' is not one of"),
    (lambda c: c["bench"].update(prompt_len=0), r"bench\.prompt_len: 0 is less than the minimum of 1"),
    (lambda c: c["schemes"]["w4g128"].update(bits="four"), r"schemes\.w4g128\.bits: 'four' is not one of \[2, 3, 4, 5, 6, 8\]"),
    (lambda c: c.pop("models"), r"\(top level\): 'models' is a required property"),
    (lambda c: c.update(extra=1), r"Additional properties are not allowed \('extra'"),
])
def test_config_schema_violations_name_the_field(mutate, field):
    cfg = copy.deepcopy(default_config())
    mutate(cfg)
    with pytest.raises(LlmoptError, match=field) as err:
        load(cfg)
    assert "\n" not in str(err.value)


def test_models_schema_violation_names_file_and_field(tmp_path):
    data = load_yaml(REPO / "config" / "models.yaml")
    data["models"]["gemma-2-2b-it"]["architecture"]["num_hidden_layers"] = -1
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(LlmoptError, match=re.escape(f"{path}: models.gemma-2-2b-it.architecture.num_hidden_layers")):
        load_models(path)
    del data["models"]["gemma-2-2b-it"]["architecture"]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(LlmoptError, match=r"'architecture' is a required property"):
        load_models(path)


def test_malformed_yaml_gives_file_and_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("models: [a, b\nscale: tiny\n")
    with pytest.raises(LlmoptError, match=re.escape(str(path)) + r": malformed YAML at line \d+") as err:
        load(path)
    assert "\n" not in str(err.value)
    with pytest.raises(LlmoptError, match=r"missing\.yaml: file not found"):
        load(tmp_path / "missing.yaml")


def test_cli_validates(capsys):
    from llmopt.registry import main

    assert main([]) == 0
    assert "9 models" in capsys.readouterr().out
