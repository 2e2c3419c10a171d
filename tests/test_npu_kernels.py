"""Every NPU kernel compiled for llvm-cpu by IREE and run through the IREE runtime, against the float64 torch
reference (llmopt.backends.npu.reference) on fresh random inputs each run; plus the template renderer and the
errors for bad kernels and shapes.

Tolerance: max |kernel - reference| <= 2e-5 * max(1, max |reference|) (float32 accumulation over <= 256 terms).
Compiled modules are cached under $LLMOPT_CACHE/iree, so only the first run pays the compile (~2 s a kernel).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from llmopt.backends.npu.compile import check_module, compile_kernels, compile_module, self_test_specs
from llmopt.backends.npu.kernels import DEFAULT_KERNEL_DIR, KernelSpec, render
from llmopt.backends.npu.reference import attention, case, compare
from llmopt.backends.npu.runtime import IreeModule
from llmopt.errors import LlmoptError

SPECS = self_test_specs()


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


@pytest.mark.parametrize("spec", SPECS, ids=[s.label for s in SPECS])
def test_kernel_matches_reference(spec):
    seed = fresh_seed()
    result = check_module(compile_module(spec), seed=seed)
    assert result["ok"], f"{spec.label} seed={seed}: {result}"


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 33])
def test_quantized_linear_any_row_count(rows):
    """The token count is dynamic: one compiled module serves decode (1 row) to prefill."""
    seed = fresh_seed()
    for kernel in ("qgemv", "qgemm"):
        spec = KernelSpec.make(kernel, N=48, K=192, G=64, BITS=4, ASYM=True)
        inputs, expected, tol = case(spec, seed=seed, rows=rows)
        got = IreeModule(compile_module(spec).path)(*inputs)
        assert compare(got, expected, tol)["ok"], f"{kernel} rows={rows} seed={seed}"


def test_attention_reference_agrees_with_cpu_backend():
    """The kernels' reference is itself checked against the engine's CPU attention (GQA + softcap + mask)."""
    from llmopt.backends.base import AttnSpec
    from llmopt.backends.cpu import CpuBackend

    g = torch.Generator().manual_seed(fresh_seed())
    q, k, v = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g)
    mask = torch.rand(2, 5, 9, generator=g) > 0.4
    mask[..., 0] = True
    for softcap in (None, 5.0):
        spec = AttnSpec(4, 2, 16, 0.3, softcap=softcap)
        ours = attention(q, k, v, mask, 0.3, softcap or 0.0)
        cpu = CpuBackend(quant="reference")._attend(q, k, v, mask[:, None], spec)
        assert torch.allclose(ours.float(), cpu, atol=1e-5)


def test_template_conditions_and_include():
    asym = render(KernelSpec.make("qgemv", N=32, K=64, G=32, BITS=4, ASYM=True, BIAS=True))
    sym = render(KernelSpec.make("qgemv", N=32, K=64, G=32, BITS=8))
    assert "%z: tensor<32x2xf16>" in asym and "%bias" in asym and "@if" not in asym and "${" not in asym
    assert "%z:" not in sym and "flow.tensor.bitcast" not in sym
    ffn = render(KernelSpec.make("gated_ffn", H=64, F=96, G=32, BITS=4, ACT="silu"))
    assert ffn.count("func.func private @") == 3 and "math.exp" in ffn and "math.tanh" not in ffn


@pytest.mark.parametrize("kernel, params, message", [
    ("qgemv", dict(N=32, K=96, G=32, BITS=3), "BITS=3"),
    ("qgemm", dict(N=32, K=100, G=32, BITS=4), "not a multiple of the group size"),
    ("qgemv", dict(N=32, K=64, G=32), "missing parameter(s) BITS"),
    ("attention", dict(HQ=6, HKV=4, D=32, SCALE=0.1), "HQ=6"),
    ("gated_ffn", dict(H=64, F=96, G=32, BITS=4, ACT="relu"), "ACT='relu'"),
    ("conv2d", dict(), "unknown kernel 'conv2d'"),
    ("attention", dict(HQ=4, HKV=2, D=32, SCALE=0.1, WINDOW=8), "unknown parameter(s) WINDOW"),
    ("qgemv", dict(N=32, K=64, G=32, BITS=4, ROWS=0), "ROWS=0 must be positive"),
])
def test_unsupported_shape_is_a_clear_error(kernel, params, message):
    with pytest.raises(LlmoptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        KernelSpec.make(kernel, **params)


def broken_kernel_dir(tmp_path):
    kdir = tmp_path / "kernels"
    shutil.copytree(DEFAULT_KERNEL_DIR, kdir)
    text = (kdir / "qgemv.mlir").read_text().replace("linalg.yield %r : f32", "linalg.yield %nosuch : f32", 1)
    (kdir / "qgemv.mlir").write_text(text)
    return kdir


def test_failed_compile_names_kernel_and_first_error(tmp_path):
    spec = KernelSpec.make("qgemv", N=32, K=64, G=32, BITS=4)
    with pytest.raises(LlmoptError) as err:
        compile_module(spec, kernel_dir=broken_kernel_dir(tmp_path), cache=tmp_path / "cache")
    msg = str(err.value)
    assert msg.startswith(f"kernel {spec.label}: llvm-cpu compile failed: error:") and "\n" not in msg
    assert "undeclared SSA value" in msg
    assert not list((tmp_path / "cache").glob("*.vmfb"))  # nothing half-written


def test_compile_stage_records_failures_and_goes_on(tmp_path):
    out = tmp_path / "kernels-out"
    manifest = compile_kernels(broken_kernel_dir(tmp_path), out, {"present": True, "reason": "test"}, "npu", models=[])
    failed = [e for e in manifest["kernels"] if e["status"] == "failed"]
    ok = [e for e in manifest["kernels"] if e["status"] == "ok"]
    # qgemv is broken, and gated_ffn includes it; every other kernel still compiles and checks out
    assert {e["kernel"] for e in failed} == {"qgemv", "gated_ffn"} and all("error:" in e["error"] for e in failed)
    assert {e["kernel"] for e in ok} == {"qgemm", "attention", "sliding_window_attention", "rope_attention", "vl_patch_merger"}
    assert all(e["check"]["ok"] for e in ok)
    assert manifest["device_target"] == "llvm-cpu" and "no NPU compiler" in manifest["note"]
    assert (out / "manifest.json").exists() and len(list(out.glob("*.vmfb"))) == len(ok)
    assert manifest["models"] == [] and manifest["failed"] == len(failed)


def test_compile_stage_rejects_unknown_target(tmp_path):
    with pytest.raises(LlmoptError, match="not an IREE target"):
        compile_kernels(tmp_path, tmp_path / "o", {}, "vulkan")
    assert not (tmp_path / "o").exists()


def test_bad_module_file(tmp_path):
    bad = tmp_path / "x.vmfb"
    bad.write_bytes(b"not a module")
    with pytest.raises(LlmoptError, match="x.vmfb"):
        IreeModule(bad)
    with pytest.raises(LlmoptError, match="not found"):
        IreeModule(tmp_path / "missing.vmfb")


def test_wrong_argument_shape_is_an_error():
    spec = KernelSpec.make("qgemv", N=64, K=256, G=64, BITS=4)
    inputs, _, _ = case(spec)
    inputs[0] = np.zeros((1, 128), np.float32)
    with pytest.raises(LlmoptError, match="IREE call failed"):
        IreeModule(compile_module(spec).path)(*inputs)


@pytest.mark.parametrize("text, message", [
    ("// @if ASYM\nfunc.func @main() {\n}\n", "@if without @endif"),
    ("// @endif\n", "@endif without @if"),
    ("x = ${NOPE}\n", "placeholder 'NOPE' has no value"),
    ("%a = 1  // @if NOFLAG\n", "unknown flag 'NOFLAG'"),
])
def test_bad_template_is_a_clear_error(tmp_path, text, message):
    (tmp_path / "qgemv.mlir").write_text(text)
    with pytest.raises(LlmoptError, match=message):
        render(KernelSpec.make("qgemv", N=32, K=64, G=32, BITS=4), tmp_path)
