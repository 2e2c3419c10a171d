"""The ``npu`` target: AMD Phoenix NPU (XDNA1, npu1) through XRT's Python binding ``pyxrt``.

``probe()`` checks, in order, everything the NPU needs and names each missing piece: the device node
(``/dev/accel/accel*``), the ``amdxdna`` kernel driver, XRT (``XILINX_XRT`` / ``libxrt_coreutil``), ``pyxrt``,
and the iree-amd-aie compiler plugin with Peano (compile.py's ``toolchain()``). Without all of them
``NpuBackend`` refuses to start with that reason, and the NPU appears in reports only through the cost model
(``llmopt.costmodel``), every number marked ``predicted: true``.

With them, ``NpuBackend`` is the iree-cpu backend whose quantized decode linears run on the NPU: each kernel is
compiled by iree-amd-aie (compile.py, target ``amd-aie``) at static shapes, the per-dispatch ``.xclbin`` and
instruction stream it dumps are loaded with pyxrt (``XrtKernel``), and the packed weights live in XRT buffer
objects. Kernels that compiled into more than one dispatch, and every other op, stay on the IREE CPU path;
``coverage()`` says which ran where. docs/NPU.md explains how to install the pieces.

    python -m llmopt.backends.npu.xrt    # prints probe()
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from llmopt.backends.npu.iree_cpu import IreeCpuBackend, IreeLinear
from llmopt.errors import LlmoptError

XRT_DEFAULT = "/opt/xilinx/xrt"


def _pyxrt():
    """Import pyxrt, also from $XILINX_XRT/python where XRT installs it."""
    root = os.environ.get("XILINX_XRT", XRT_DEFAULT)
    if os.path.isdir(os.path.join(root, "python")) and os.path.join(root, "python") not in sys.path:
        sys.path.append(os.path.join(root, "python"))
    return importlib.import_module("pyxrt")


def probe() -> dict:
    from llmopt.backends.npu.compile import toolchain

    missing = []
    devices = sorted(glob.glob("/dev/accel/accel*"))
    if not devices:
        missing.append("no XDNA device node /dev/accel/accel* (needs an AMD Ryzen AI NPU and its driver)")
    if not os.path.isdir("/sys/module/amdxdna"):
        missing.append("the amdxdna kernel driver is not loaded (Linux >= 6.14 in-tree, or amd/xdna-driver)")
    xrt_root = os.environ.get("XILINX_XRT", XRT_DEFAULT)
    if not (os.path.isdir(xrt_root) or ctypes.util.find_library("xrt_coreutil")):
        missing.append(f"XRT is not installed (no {xrt_root}, no libxrt_coreutil; build Xilinx/XRT with the xdna plugin)")
    try:
        pyxrt = _pyxrt()
        pyxrt_version = getattr(pyxrt, "__version__", "present")
    except ImportError as err:
        pyxrt_version = None
        missing.append(f"pyxrt does not import ({err}; it ships with XRT under $XILINX_XRT/python)")
    tc = toolchain()
    if not tc["amd_aie"]:
        missing.extend(m for m in tc["missing"] if "amd-aie" in m or "iree-amd-aie" in m)
    elif not tc["peano"]:
        missing.append("Peano (llvm-aie) for the AIE cores: set PEANO_INSTALL_DIR")
    present = not missing
    return {
        "present": present,
        "reason": "XDNA NPU, driver, XRT, pyxrt and the iree-amd-aie compiler are all here" if present
        else "missing: " + "; ".join(missing),
        "device": {"name": "AMD Phoenix NPU (XDNA1, npu1: 4x5 AIE2 compute tiles)", "nodes": devices},
        "features": {"missing": missing, "pyxrt": pyxrt_version, "compiler": tc.get("aie_compile"),
                     "predicted_only": not present,
                     "note": "absent NPU: partition and report use llmopt.costmodel predictions (predicted: true)"},
    }


class XrtKernel:
    """One single-dispatch kernel on the NPU: its xclbin, instruction stream and a hardware context."""

    def __init__(self, artifacts: Path):
        pyxrt = _pyxrt()
        xclbins = sorted(Path(artifacts).rglob("*.xclbin"))
        insts = sorted(p for p in Path(artifacts).rglob("*")
                       if p.suffix in (".bin", ".txt") and ("npu" in p.name or "insts" in p.name))
        if len(xclbins) != 1 or len(insts) != 1:
            raise LlmoptError(f"{artifacts}: expected one .xclbin and one instruction file (a single-dispatch kernel), "
                              f"found {len(xclbins)} and {len(insts)}")
        self.pyxrt = pyxrt
        self.device = pyxrt.device(0)
        xclbin = pyxrt.xclbin(str(xclbins[0]))
        self.device.register_xclbin(xclbin)
        self.context = pyxrt.hw_context(self.device, xclbin.get_uuid())
        name = next(k.get_name() for k in xclbin.get_kernels())
        self.kernel = pyxrt.kernel(self.context, name)
        words = _read_insts(insts[0])
        self.n_insts = words.size
        self.bo_insts = pyxrt.bo(self.device, words.nbytes, pyxrt.bo.cacheable, self.kernel.group_id(1))
        self.bo_insts.write(words.tobytes(), 0)
        self.bo_insts.sync(pyxrt.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE)

    def buffer(self, array: np.ndarray, slot: int):
        """An XRT buffer object holding ``array`` for kernel argument ``slot`` (weights: once)."""
        bo = self.pyxrt.bo(self.device, max(array.nbytes, 4), self.pyxrt.bo.host_only, self.kernel.group_id(3 + slot))
        bo.write(np.ascontiguousarray(array).tobytes(), 0)
        bo.sync(self.pyxrt.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE)
        return bo

    def __call__(self, bos: list, out_bo, out: np.ndarray) -> np.ndarray:
        run = self.kernel(3, self.bo_insts, self.n_insts, *bos, out_bo)  # opcode 3: run the instruction stream
        state = run.wait()
        if "COMPLETED" not in str(state):
            raise LlmoptError(f"NPU kernel did not complete ({state})")
        out_bo.sync(self.pyxrt.xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE)
        return np.frombuffer(out_bo.read(out.nbytes, 0), dtype=out.dtype).reshape(out.shape)


def _read_insts(path: Path) -> np.ndarray:
    """The NPU instruction stream: binary uint32 words, or one hex word per line (``*.npu.txt``)."""
    if path.suffix == ".txt":
        return np.array([int(w, 16) for w in path.read_text().split()], dtype=np.uint32)
    return np.fromfile(path, dtype=np.uint32)


class NpuBackend(IreeCpuBackend):
    """iree-cpu with the single-row quantized linears (decode GEMV) on the NPU; see the module docstring."""

    name = "npu"

    def __init__(self, kernels_dir: str | Path | None = None, threads: int | None = None):
        status = probe()
        if not status["present"]:
            raise LlmoptError(f"npu: {status['reason']}")
        super().__init__(kernels_dir=kernels_dir, threads=threads)
        self._npu: dict = {}  # KernelSpec -> XrtKernel, or the reason it stays on the CPU (coverage() shows it)

    def coverage(self) -> dict:
        cov = super().coverage()
        cov["npu_kernels"] = {s.label: ("xrt" if isinstance(k, XrtKernel) else k) for s, k in self._npu.items()}
        return cov

    def _on_npu(self, w: IreeLinear):
        from llmopt.backends.npu.compile import compile_module
        from llmopt.backends.npu.kernels import KernelSpec

        spec = KernelSpec.make("qgemv", **w.gemv.p, ROWS=1)  # AIE kernels are static: one decode row
        if spec not in self._npu:  # a failed NPU compile leaves the layer on the CPU, with the reason kept
            try:
                self._npu[spec] = XrtKernel(compile_module(spec, "amd-aie", prebuilt=self.kernels_dir).artifacts)
            except LlmoptError as err:
                self._npu[spec] = str(err)
        return self._npu[spec]

    def linear(self, x, w):
        import torch

        rows = int(np.prod(x.shape[:-1]))
        kern = self._on_npu(w) if isinstance(w, IreeLinear) and rows == 1 else None
        if not isinstance(kern, XrtKernel):
            return super().linear(x, w)
        self.calls["linear", "npu"] += 1
        if not hasattr(w, "bos"):
            w.bos = [kern.buffer(a.to_host() if hasattr(a, "to_host") else a, i + 1) for i, a in enumerate(w.args)]
            w.out = np.zeros((1, w.out_features), np.float32)
            w.out_bo = kern.buffer(w.out, len(w.args) + 1)
        xa = x.reshape(1, -1).to(torch.float32).numpy()
        y = kern([kern.buffer(xa, 0), *w.bos], w.out_bo, w.out)
        return torch.from_numpy(y.copy()).view(*x.shape[:-1], w.out_features)


if __name__ == "__main__":
    print(json.dumps(probe(), indent=2))
    sys.exit(0)
