"""llmopt.partition: the ILP is exactly optimal (checked against exhaustive search), budgets hold, infeasible
budgets and absent targets are recorded, partition.json follows the contract and the engine runs the plan."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from llmopt import roofline
from llmopt.analysis import Arch, Precision, analyze
from llmopt.errors import LlmoptError
from llmopt.fsutil import write_json
from llmopt.partition import DEFAULT_BUDGETS, laptop_plan, parse_bytes, solve, write_plan


def brute_force(cost, link, mem, budgets, tied):
    devices = list(cost[0])
    best, best_a = float("inf"), None
    for a in itertools.product(devices, repeat=len(cost)):
        used = {d: 0.0 for d in devices}
        for u, d in enumerate(a):
            used[d] += mem[u]
        if tied and a[0] == a[-1]:
            used[a[0]] -= tied
        if any(used[d] > budgets[d] for d in budgets):
            continue
        t = sum(cost[u][d] for u, d in enumerate(a)) + sum(link[a[u - 1], a[u]] for u in range(1, len(a))
                                                           if a[u - 1] != a[u])
        if t < best - 1e-12:
            best, best_a = t, list(a)
    return best, best_a


@pytest.mark.parametrize("seed", range(6))
def test_ilp_matches_exhaustive_search(seed):
    rng = random.Random(seed)
    devices = ["npu", "vulkan", "cpu"]
    n = 6
    cost = [{d: rng.uniform(0.1, 2.0) for d in devices} for _ in range(n)]
    link = {(a, b): rng.uniform(0.0, 0.8) for a in devices for b in devices if a != b}
    mem = [rng.uniform(1.0, 3.0) for _ in range(n)]
    tied = mem[0] * 0.9 if seed % 2 else 0.0
    if tied:
        mem[-1] += tied  # the head holds its own copy of the shared table
    budgets = {"npu": rng.uniform(2.0, 6.0), "vulkan": rng.uniform(3.0, 8.0)}
    want, want_a = brute_force(cost, link, mem, budgets, tied)
    got_a = solve(cost, link, mem, budgets, tied)
    got = sum(cost[u][d] for u, d in enumerate(got_a)) + sum(link[got_a[u - 1], got_a[u]] for u in range(1, n)
                                                             if got_a[u - 1] != got_a[u])
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9), (got_a, want_a)


def test_infeasible_budget_raises_naming_the_budgets():
    cost = [{"npu": 1.0, "vulkan": 1.0}] * 3
    link = {("npu", "vulkan"): 0.1, ("vulkan", "npu"): 0.1}
    with pytest.raises(LlmoptError, match="no partition meets the budgets"):
        solve(cost, link, [5.0, 5.0, 5.0], {"npu": 4.0, "vulkan": 4.0})


def test_parse_bytes():
    assert parse_bytes("2GB") == 2e9 and parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes(1.5e9) == 1.5e9
    for bad in ("two GB", "-1GB", -5, "12 parsecs"):
        with pytest.raises(LlmoptError, match="not a size"):
            parse_bytes(bad, "settings.budgets.npu")


@pytest.fixture(scope="module")
def qwen7b():
    from llmopt.registry import load

    return load().all_models["qwen2.5-7b-instruct"]


def test_laptop_plan_beats_or_equals_the_seed_heuristic(qwen7b):
    arch = Arch.from_entry(qwen7b, "qwen2.5-7b-instruct")
    lap = laptop_plan(arch, Precision(linear_bpw=4.125), {}, DEFAULT_BUDGETS, qwen7b["seed"])
    for prof in ("phoenix-ddr5", "phoenix-lpddr5x"):
        p = lap[prof]
        assert p["feasible"] and "error" not in p
        assert p["bytes_per_device"].get("npu", 0) <= 2e9 and p["bytes_per_device"].get("vulkan", 0) <= 16e9
        assert p["heuristic"]["rule"].startswith("seed size class: 50%")
        assert p["predicted"]["decode_tok_s"] >= p["heuristic"]["predicted"]["decode_tok_s"] * (1 - 1e-9)
        # physics: batch-1 decode can't beat DRAM bandwidth / bytes per token, far below the seed's 200 tok/s
        assert p["predicted"]["decode_tok_s"] <= p["predicted"]["ceiling_decode_tok_s"] < qwen7b["seed"]["tok_s"][0]
        sweep = [p["batch_sweep"][b] for b in sorted(p["batch_sweep"])]
        assert sweep == sorted(sweep)  # aggregate throughput grows with the batch
    assert lap["phoenix-lpddr5x"]["predicted"]["ceiling_decode_tok_s"] == pytest.approx(
        lap["phoenix-ddr5"]["predicted"]["ceiling_decode_tok_s"] * 120 / 89.6, rel=1e-6)


def _calibration(tmp_path, vulkan_op_s: float = 50e-6):
    """A calibration record in bench/calibrate.py's format, with fixed numbers: partition tests must not time."""
    path = tmp_path / "calibration.json"
    write_json(path, {"date": "test", "host": {"bandwidth": 10e9, "matmul_float32": 100e9, "matmul_bfloat16": 200e9},
                      "backends": {"cpu": {"int4_gemv_bytes_s": 2e9, "gemm_flops_s": 50e9, "op_overhead_s": 5e-6,
                                           "link_latency_s": 0.0, "link_bandwidth": 1e12},
                                   "vulkan": {"int4_gemv_bytes_s": 4e9, "gemm_flops_s": 20e9, "op_overhead_s": vulkan_op_s,
                                              "link_latency_s": 30e-6, "link_bandwidth": 2e9}}})
    return str(path)


PROBES = {"cpu": {"present": True, "reason": "host"}, "vulkan": {"present": True, "reason": "lavapipe"},
          "npu": {"present": False, "reason": "no /dev/accel/accel0"}}


def test_write_plan_contract_and_diagram(tmp_path, qwen7b):
    from test_bench_models import build_tiny

    _, quant = build_tiny(tmp_path)
    out = tmp_path / "tiny-qwen" / "w4" / "vulkan" / "partition.json"
    settings = {"calibration": _calibration(tmp_path), "budgets": {"npu": "2GB", "vulkan": "16GB"},
                "prompt_len": 64, "gen_len": 16}
    rec = write_plan(quant, qwen7b, "vulkan", PROBES, settings, out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(rec, default=str, sort_keys=True))
    for key in ("model", "scheme", "target", "solver", "budgets", "segments", "embedding", "head", "transfers",
                "predicted", "heuristic"):
        assert key in rec, key
    assert rec["model"] == "qwen2.5-7b-instruct"  # the registry entry's id names the model
    assert rec["scheme"] == "w4" and rec["devices"] == ["vulkan", "cpu"]
    covered = [i for s in rec["segments"] for i in range(s["layers"][0], s["layers"][1] + 1)]
    assert covered == [0, 1, 2]
    assert {s["device"] for s in rec["segments"]} <= {"vulkan", "cpu"}
    assert rec["predicted"]["decode_tok_s"] > 0 and rec["predicted"]["prefill_tok_s"] > 0
    assert rec["laptop"]["phoenix-ddr5"]["segments"]  # full-scale qwen2.5-7b on the laptop, beside it
    png = out.with_name("partition.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_infeasible_budget_and_absent_target_are_recorded(tmp_path, qwen7b):
    from test_bench_models import build_tiny

    _, quant = build_tiny(tmp_path)
    settings = {"calibration": _calibration(tmp_path), "budgets": {"vulkan": "1KB", "cpu": "1KB"}}
    out = tmp_path / "p.json"
    rec = write_plan(quant, qwen7b, "vulkan", PROBES, settings, out)
    assert rec["infeasible"] and "no partition meets the budgets" in rec["error"]
    assert json.loads(out.read_text())["error"] == rec["error"] and out.with_name("partition.png").is_file()
    rec = write_plan(quant, qwen7b, "npu", PROBES, {"calibration": _calibration(tmp_path)}, tmp_path / "n.json")
    assert rec["skipped"] and "no /dev/accel/accel0" in rec["reason"]
    assert rec["laptop"]["phoenix-ddr5"]["predicted"]["decode_tok_s"] > 0  # the prediction needs no hardware


@pytest.mark.vulkan
def test_engine_executes_the_written_plan(tmp_path, qwen7b):
    """partition.json as written is a plan the engine runs across Vulkan (lavapipe) and the CPU, matching the
    float reference."""
    from llmopt.backends import get_backend, probe
    from llmopt.bench.measure import check_correctness
    from llmopt.engine import load_model
    from test_bench_models import build_tiny

    if not probe("vulkan")["present"]:
        pytest.skip("no Vulkan device")
    _, quant = build_tiny(tmp_path)
    # lavapipe is made the faster device, but its budget holds only one decoder layer: the rest goes to the CPU
    settings = {"calibration": _calibration(tmp_path, vulkan_op_s=1e-6), "prompt_len": 64, "gen_len": 16,
                "budgets": {"vulkan": "150KB"}}
    rec = write_plan(quant, qwen7b, "vulkan", PROBES, settings, tmp_path / "partition.json")
    assert rec["assignment"].count("vulkan") == 1 and rec["bytes_per_device"]["vulkan"] <= 150e3
    model = load_model(quant, plan=rec)
    ref = load_model(quant, backend=get_backend("cpu", quant="reference"))
    check = check_correctness(model, ref, 384, tokens=12, decode_steps=4, tol=2e-2)
    assert check["passed"], check


def test_roofline_prediction_is_bounded_by_its_ceiling(qwen7b):
    an = analyze(Arch.from_entry(qwen7b, "q"), Precision(linear_bpw=4.125))
    for prof in roofline.stated_profiles().values():
        for dev in prof.devices:
            p = roofline.predict(an, prof, dev)
            assert 0 < p["decode_tok_s"] <= p["ceiling_decode_tok_s"]
            assert 0 < p["prefill_tok_s"] <= p["ceiling_prefill_tok_s"]
    h100 = roofline.predict(an, roofline.stated_profiles()["h100"], "cuda")
    weights = sum(op.weight_bytes for op in an.ops if op.kind == "linear")
    assert h100["ceiling_decode_tok_s"] == pytest.approx(3.35e12 / weights, rel=0.03)
