"""The probe stage and the `llmopt probe` / `llmopt download` commands: records, one-line errors, atomic output."""

from __future__ import annotations

import json

import pytest

from llmopt.cli import main
from llmopt.errors import LlmoptError
from llmopt.probe import probe_record, write_probe


def test_cpu_probe_record(tmp_path):
    out = tmp_path / "targets" / "cpu.json"
    record = write_probe("cpu", out)
    assert json.loads(out.read_text()) == record
    assert record["target"] == "cpu" and record["present"] is True and record["reason"]
    assert record["probed_at"].endswith("+00:00") and isinstance(record["device"], dict)
    assert [p.name for p in out.parent.iterdir()] == ["cpu.json"]  # no temporary left behind


def test_absent_target_is_a_record_not_an_error():
    record = probe_record("npu")  # no Phoenix NPU on a CI machine
    assert record["present"] is False and "missing" in record["reason"]


def test_unknown_target():
    with pytest.raises(LlmoptError, match=r"unknown target 'tpu' \(expected one of cpu, cuda, vulkan, iree-cpu, npu\)"):
        probe_record("tpu")


def test_probe_command(tmp_path, capsys):
    assert main(["probe", "cpu", "-o", str(tmp_path / "cpu.json")]) == 0
    assert "cpu: present" in capsys.readouterr().out
    assert main(["probe", "cpu", "npu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cpu") and "present" in lines[0] and "absent" in lines[1]
    assert main(["probe", "tpu"]) == 2
    assert capsys.readouterr().err.strip().startswith("llmopt: error: unknown target 'tpu'")


def test_download_command(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["download", "gemma-2-2b-it", "--scale", "tiny", "-o", str(out)]) == 0
    assert "gemma-2-2b-it: synthetic (tiny)" in capsys.readouterr().out
    assert main(["download", "--verify", str(out)]) == 0
    assert main(["download", "gpt-5", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmopt: error: unknown model id 'gpt-5'") and "\n" not in err
    assert not (tmp_path / "x").exists()
