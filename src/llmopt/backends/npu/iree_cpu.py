"""The ``iree-cpu`` target: the NPU's MLIR kernels compiled by IREE for ``llvm-cpu``, running whole models.

``IreeCpuBackend`` subclasses ``llmopt.backends.cpu.CpuBackend`` and overrides the ops the kernels cover:

- ``linear`` with a 2/4/8-bit packed weight (any group, symmetric or not, f16/bf16 scales, optional bias):
  ``qgemv.mlir`` for fewer than ``QGEMM_MIN_ROWS`` rows (decode), ``qgemm.mlir`` above (prefill); the packed
  rows, scales and zeros are uploaded once, as stored, and unpacked inside the kernel;
- the softmax attention core (``attention.mlir``, GQA, Gemma 2 softcap): the CPU backend keeps its KV cache and
  builds the causal/window/padding mask, the kernel does scores, softcap, mask, softmax and the value sum.

Everything else stays on torch and is counted as such: float and 3-bit linears, embeddings, norms, RoPE,
activations, residual adds, the vision tower's segment attention. ``coverage()`` reports both lists and the
call counts; the benchmark records it. Modules compile on first use (cached on disk, see compile.py) or come
from the compile stage's folder (``kernels_dir``).

    python -m llmopt.backends.npu.iree_cpu    # prints probe()
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from llmopt.backends.cpu import CpuBackend
from llmopt.backends.cpu import probe as cpu_probe
from llmopt.backends.npu.kernels import QGEMM_MIN_ROWS, KernelSpec
from llmopt.errors import LlmoptError
from llmopt.quant.format import QuantizedTensor

IREE_OPS = {"linear (2/4/8-bit packed)": "qgemv.mlir (< %d rows) / qgemm.mlir" % QGEMM_MIN_ROWS,
            "attention core (scores, softcap, mask, softmax, values)": "attention.mlir"}
TORCH_OPS = ["linear (float or 3-bit weights)", "embedding", "rmsnorm", "layernorm", "rope", "gated_act", "act",
             "add", "KV cache writes and masks", "attention_full (vision tower)", "logits softcap"]


class IreeLinear:
    """A packed weight uploaded for the qgemv/qgemm kernels."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None, upload):
        from llmopt.backends.npu.reference import quant_args

        self.out_features, self.in_features = qt.shape
        params = dict(N=qt.shape[0], K=qt.shape[1], G=qt.group, BITS=qt.bits, ASYM=not qt.sym,
                      SCALE=str(qt.scales.dtype).removeprefix("torch."), BIAS=bias is not None)
        self.gemv, self.gemm = KernelSpec.make("qgemv", **params), KernelSpec.make("qgemm", **params)
        args = quant_args(qt)
        if bias is not None:
            args.append(bias.float().numpy())
        self.args = [upload(a) for a in args]
        self.nbytes = sum(a.nbytes for a in args)


class IreeCpuBackend(CpuBackend):
    name = "iree-cpu"

    def __init__(self, kernels_dir: str | Path | None = None, threads: int | None = None, attention: bool = True):
        status = probe()
        if not status["present"]:
            raise LlmoptError(f"iree-cpu: {status['reason']}")
        super().__init__(quant="fast", threads=threads)
        self.kernels_dir = Path(kernels_dir) if kernels_dir else None
        self.use_attention = attention
        self._modules: dict[KernelSpec, object] = {}
        self.calls: Counter = Counter()  # (op, "iree" | "torch") -> calls
        self.fallbacks: dict[str, str] = {}  # weight name -> why it runs on torch
        self.compile_seconds = 0.0

    # --- kernels -----------------------------------------------------------------------------------
    def module(self, spec: KernelSpec):
        """The loaded module for ``spec``: from the compile stage's folder, the disk cache, or compiled now."""
        mod = self._modules.get(spec)
        if mod is None:
            from llmopt.backends.npu.compile import compile_module
            from llmopt.backends.npu.runtime import IreeModule

            compiled = compile_module(spec, "llvm-cpu", prebuilt=self.kernels_dir)
            self.compile_seconds += compiled.seconds
            mod = self._modules[spec] = IreeModule(compiled.path)
        return mod

    @staticmethod
    def _upload(array: np.ndarray):
        from llmopt.backends.npu.runtime import upload

        return upload(array)

    # --- weights -----------------------------------------------------------------------------------
    def linear_weight(self, name, weight, bias=None):
        if isinstance(weight, QuantizedTensor) and weight.bits in (2, 4, 8):
            lin = IreeLinear(weight, bias, self._upload)
            self.kinds["iree-q%d" % weight.bits] = self.kinds.get("iree-q%d" % weight.bits, 0) + 1
            return lin
        self.fallbacks[name] = ("float weight" if not isinstance(weight, QuantizedTensor)
                                else f"{weight.bits}-bit weight (kernels cover 2, 4, 8)")
        return super().linear_weight(name, weight, bias)

    # --- ops ---------------------------------------------------------------------------------------
    def linear(self, x, w):
        if not isinstance(w, IreeLinear):
            self.calls["linear", "torch"] += 1
            return super().linear(x, w)
        self.calls["linear", "iree"] += 1
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.float32).contiguous().numpy()
        spec = w.gemv if x2.shape[0] < QGEMM_MIN_ROWS else w.gemm
        (y,) = self.module(spec)(x2, *w.args)
        return torch.from_numpy(y).view(*shape[:-1], w.out_features)

    def _attend(self, q, k, v, mask, spec):
        if not self.use_attention:
            self.calls["attention", "torch"] += 1
            return super()._attend(q, k, v, mask, spec)
        self.calls["attention", "iree"] += 1
        B, H, T, _ = q.shape
        kspec = KernelSpec.make("attention", HQ=H, HKV=spec.n_kv_heads, D=spec.head_dim, SCALE=spec.scale,
                                SOFTCAP=spec.softcap or 0.0)
        S = k.shape[2]
        m = (np.ones((B, T, S), np.int8) if mask is None  # None: every query sees every key
             else mask[:, 0].expand(B, T, S).to(torch.int8).contiguous().numpy())
        args = [t.to(torch.float32).contiguous().numpy() for t in (q, k, v)]
        (out,) = self.module(kspec)(*args, m)
        return torch.from_numpy(out)

    def coverage(self) -> dict:
        """Which ops ran on the IREE kernels and which on torch (with call counts): recorded by the benchmark."""
        return {"iree": IREE_OPS if self.use_attention else {k: v for k, v in IREE_OPS.items() if "attention" not in k},
                "torch": TORCH_OPS + ([] if self.use_attention else ["attention core"]),
                "calls": {f"{op}:{where}": n for (op, where), n in sorted(self.calls.items())},
                "torch_linears": dict(self.fallbacks), "compile_seconds": round(self.compile_seconds, 3)}


def probe() -> dict:
    """Present when the IREE compiler (llvm-cpu) and runtime (local-task) import; the device is the host CPU."""
    from llmopt.backends.npu.compile import LLVM_CPU_FLAGS, toolchain

    cpu = cpu_probe()
    tc = toolchain()
    missing = list(m for m in tc["missing"] if m.startswith("IREE compiler"))
    if tc["iree_compiler"] and "llvm-cpu" not in tc["targets"]:
        missing.append("the IREE compiler lacks the llvm-cpu target")
    try:
        import importlib.metadata

        import iree.runtime as rt

        runtime = importlib.metadata.version("iree-base-runtime")
        if "local-task" not in rt.query_available_drivers():
            missing.append("the IREE runtime lacks the local-task driver")
    except ImportError as err:
        runtime = None
        missing.append(f"IREE runtime (pip install iree-base-runtime: {err})")
    present = not missing
    return {
        "present": present,
        "reason": "IREE compiles the NPU kernels for this CPU (llvm-cpu) and runs them (local-task)" if present
        else "missing: " + "; ".join(missing),
        "device": cpu["device"],
        "features": {"iree_compiler": tc["iree_compiler"], "iree_runtime": runtime, "flags": LLVM_CPU_FLAGS,
                     "ops_on_iree": IREE_OPS, "ops_on_torch": TORCH_OPS,
                     **{k: v for k, v in cpu["features"].items() if k.startswith("avx")}},
    }


if __name__ == "__main__":
    print(json.dumps(probe(), indent=2))
    sys.exit(0)
