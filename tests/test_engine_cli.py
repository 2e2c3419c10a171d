"""``llmopt generate``: streams the same text as the engine's greedy generation; bad input exits 2 with one line."""

from __future__ import annotations

import pytest

from llmopt.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny")
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
    return path


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmopt: error: ") and "\n" not in err
    return err


def test_folder_without_tokenizer(tiny_folder, capsys):
    assert main(["generate", str(tiny_folder), "hello"]) == 2
    assert "no tokenizer.json" in error_line(capsys)


def test_unknown_model(capsys, tmp_path):
    assert main(["generate", str(tmp_path / "missing"), "hello"]) == 2
    assert "neither a folder nor a registry id" in error_line(capsys)


def test_registry_id_without_results(capsys, tmp_path):
    assert main(["generate", "gemma-3-270m", "hi", "--scheme", "w4g128", "--results", str(tmp_path)]) == 2
    assert "run the quantize stage for scheme 'w4g128'" in error_line(capsys)


def test_reference_flag_only_for_torch_backends(tiny_folder, capsys):
    assert main(["generate", str(tiny_folder), "x", "--backend", "vulkan", "--reference"]) == 2
    assert "--reference applies to the cpu and cuda backends" in error_line(capsys)


@pytest.mark.real_model
def test_streams_greedy_text(reference_model_dir, capsys):
    from llmopt.engine import load_model

    prompt = "The capital of France is"
    assert main(["generate", str(reference_model_dir), prompt, "--max-tokens", "8", "--no-chat", "--stats"]) == 0
    out = capsys.readouterr()
    expected = load_model(reference_model_dir).generate(prompt, max_new_tokens=8).texts[0]
    assert out.out == expected + "\n"
    assert "decode" in out.err and "prefill" in out.err
