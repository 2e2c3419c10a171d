"""llmopt.bench: correctness before timing, timing records, baselines, and every failure recorded (not raised)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from llmopt.bench import run_benchmark, to_csv
from llmopt.errors import LlmoptError

SMALL = {"prompt_len": 16, "gen_len": 4, "batches": [1, 2], "warmup": 0, "repeats": 2, "check_tokens": 8,
         "baselines": ["hf", "llama.cpp"]}
CPU_PROBE = {"present": True, "reason": "host", "device": {"name": "test cpu"}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_bench_models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("bench"))


def test_cpu_benchmark_checks_then_times(tiny, tmp_path):
    source, quant = tiny
    out = tmp_path / "bench.json"
    rec = run_benchmark(quant, source, None, "cpu", CPU_PROBE, SMALL, out)
    assert json.loads(out.read_text())["model"] == "tiny-qwen"
    assert rec["scheme"] == "w4" and rec["target"] == "cpu" and "skipped" not in rec
    (run,) = rec["runs"]
    assert run["config"] == "target" and run["devices"] == ["cpu"]
    c = run["correctness"]
    assert c["passed"] and c["finite"] and c["max_rel_err"] <= 2e-2 and c["positions"] == 5
    assert [r["batch"] for r in run["results"]] == [1, 2]
    for r in run["results"]:
        for key in ("prefill_tok_s", "decode_tok_s", "ttft_s"):
            st = r[key]
            assert st["n"] == 2 and len(st["samples"]) == 2 and st["min"] <= st["median"] <= st["max"]
            assert st["median"] > 0
    assert run["memory"]["peak_rss_bytes"] >= run["memory"]["peak_rss_bytes"] - run["memory"]["peak_rss_delta_bytes"]
    hf, llama = rec["baselines"]
    assert hf["name"] == "hf" and hf["decode_tok_s"]["median"] > 0 and "transformers" in hf["engine"]
    assert llama == {"name": "llama.cpp", "skipped": True, "reason": "no GGUF for this model"}
    assert rec["summary"]["decode_tok_s"] == run["results"][0]["decode_tok_s"]["median"]
    env = rec["environment"]
    assert env["packages"]["torch"] and env["cores"] >= 1 and env["target_device"] == {"name": "test cpu"}
    rows = list(csv.DictReader(io.StringIO(out.with_suffix(".csv").read_text())))
    assert [r["config"] for r in rows] == ["target", "target", "baseline", "baseline"]
    assert float(rows[0]["decode_tok_s"]) == pytest.approx(run["results"][0]["decode_tok_s"]["median"])


def test_failed_correctness_is_recorded_and_not_timed(tiny, tmp_path):
    source, quant = tiny
    # A tolerance no float kernel meets: the int4 CPU path differs from the float64-exact reference by rounding.
    rec = run_benchmark(quant, None, None, "cpu", CPU_PROBE, {**SMALL, "tolerance": 1e-12}, tmp_path / "b.json")
    (run,) = rec["runs"]
    assert not run["correctness"]["passed"] and "not timed" in run["error"] and "results" not in run
    assert rec["summary"]["correct"] is False
    assert "correctness check failed" in to_csv([rec])


def test_absent_and_vanished_targets_are_skipped(tiny, tmp_path):
    source, quant = tiny
    rec = run_benchmark(quant, source, None, "npu", {"present": False, "reason": "no XDNA driver"}, SMALL,
                        tmp_path / "a.json")
    assert rec["skipped"] and "absent at probe: no XDNA driver" in rec["reason"]
    # The probe file says present, but the device is not here now (no NPU on this machine): "vanished".
    rec = run_benchmark(quant, source, None, "npu", {"present": True, "reason": "ok"}, SMALL, tmp_path / "v.json")
    assert rec["skipped"] and rec["vanished"] and "gone now" in rec["reason"]
    assert json.loads((tmp_path / "v.json").read_text())["vanished"] is True


@pytest.mark.parametrize("bad", [{"batches": []}, {"batches": [0]}, {"repeats": 0}, {"prompt_len": "512"},
                                 {"check_tokens": 2}])
def test_bad_settings_are_one_line_errors(tiny, tmp_path, bad):
    source, quant = tiny
    with pytest.raises(LlmoptError, match="bench settings"):
        run_benchmark(quant, source, None, "cpu", CPU_PROBE, {**SMALL, **bad}, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.vulkan
def test_partition_plan_across_vulkan_and_cpu(tiny, tmp_path):
    """The plan of partition.json (layers split over lavapipe and the CPU) is checked and timed beside the
    whole-model run, with the predictions of the plan carried into the record."""
    from llmopt.backends import probe

    vk = probe("vulkan")
    if not vk["present"]:
        pytest.skip(f"no Vulkan device: {vk['reason']}")
    source, quant = tiny
    plan = tmp_path / "partition.json"
    plan.write_text(json.dumps({"segments": [{"layers": [0, 1], "device": "vulkan"}, {"layers": [2, 2], "device": "cpu"}],
                                "embedding": "cpu", "head": "cpu", "predicted": {"decode_tok_s": 100.0},
                                "single_target": {"decode_tok_s": 50.0}}))
    rec = run_benchmark(quant, None, plan, "vulkan", vk, {**SMALL, "batches": [1]}, tmp_path / "b.json")
    assert [r["config"] for r in rec["runs"]] == ["target", "partition"]
    part = rec["runs"][1]
    assert sorted(part["devices"]) == ["cpu", "vulkan"] and part["correctness"]["passed"], part.get("error")
    assert part["results"][0]["decode_tok_s"]["median"] > 0
    assert rec["plan_summary"]["predicted"] == {"decode_tok_s": 100.0}


@pytest.mark.real_model
def test_llama_cpp_baseline_on_the_real_gguf():
    pytest.importorskip("llama_cpp")
    from llmopt.bench.baselines import llama_cpp_baseline
    from llmopt.download.pip_gguf import assemble_gguf

    b = llama_cpp_baseline(assemble_gguf(), prompt=32, gen=8, warmup=0, repeats=1)
    assert b["decode_tok_s"]["median"] > 0 and b["prefill_tok_s"]["median"] > 0 and "llama-cpp-python" in b["engine"]


def test_time_runs_drops_warmup_and_counts_every_token():
    from llmopt.bench.measure import time_runs

    calls = iter([(9.0, 9.0), (0.5, 2.0), (0.25, 4.0)])  # one warm-up run, then two timed ones
    t = time_runs(lambda: next(calls), batch=2, prompt=10, gen=8, warmup=1, repeats=2)
    assert t["prefill_tok_s"]["samples"] == [40.0, 80.0]  # batch x prompt / prefill seconds
    assert t["decode_tok_s"]["samples"] == [8.0, 4.0]  # batch x gen / decode seconds
    assert t["ttft_s"]["samples"] == [0.5, 0.25] and t["decode_tok_s"]["median"] == 6.0
    assert (t["batch"], t["prompt"], t["gen"]) == (2, 10, 8)
