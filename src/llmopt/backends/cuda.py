"""CudaBackend: the CPU backend's torch ops on an NVIDIA GPU, with torch's CUDA int4 kernel for 4-bit weights.

Same contract and code as ``llmopt.backends.cpu.CpuBackend`` (float32 activations, float reference mode), with
two differences: 4-bit weights are repacked into the tensor-core layout of ``aten._convert_weight_to_int4pack``
and multiplied by ``aten._weight_int4pack_mm`` (bfloat16 activations inside the kernel, as it requires), and
low-bit fallbacks and a packed embedding table are dequantized to bfloat16 on the device (a per-call dequantize of
gathered rows would go through the host). With ``cuda_graphs=True`` (default) ``Model.decode_step`` captures the
unpadded decode step once as a CUDA graph (``llmopt.engine.cudagraph``) and replays it per token. With
``fuse_linears=True`` (default) the projections of one input (q/k/v, gate/up) run as one int4 matmul over weights
concatenated along N on first use (the int4 tiling is per 8 output rows, so packed tiles concatenate as they are).
``probe()`` reports the GPU, or why there is none.

    python -m llmopt.backends.cuda    # prints probe()
"""

from __future__ import annotations

import json
import sys

import torch

from llmopt.backends.cpu import CpuBackend, QLinear
from llmopt.errors import LlmoptError
from llmopt.quant.format import QuantizedTensor

_INNER_K_TILES = 8  # the kernel's K tiling (2, 4 or 8); 8 reads the most bytes per load


class CudaBackend(CpuBackend):
    name = "cuda"

    def __init__(self, quant: str = "fast", lowbit_dtype: torch.dtype | str = torch.bfloat16, device: str = "cuda",
                 cuda_graphs: bool = True, fuse_linears: bool = True):
        rec = probe()
        if not rec["present"]:
            raise LlmoptError(f"cuda backend: {rec['reason']}")
        super().__init__(quant=quant, lowbit_dtype=lowbit_dtype, kernel_dtype=torch.bfloat16, device=device,
                         repack_cache=None)
        self.cuda_graphs, self.fuse_linears = cuda_graphs, fuse_linears
        self._fused: dict[tuple, tuple] = {}  # ids of the parts -> (parts, kept alive so ids stay unique; fused)

    def embedding_table(self, name, weight):
        if isinstance(weight, QuantizedTensor) and self.quant == "fast":  # dequantized on the host, then uploaded
            host = QuantizedTensor(weight.qweight.cpu(), weight.scales.cpu(),
                                   None if weight.zeros is None else weight.zeros.cpu(), weight.bits, weight.group,
                                   weight.shape)
            return self._dense(host, self.lowbit_dtype)
        return super().embedding_table(name, weight)

    def linear_weight(self, name, weight, bias=None):
        lin = super().linear_weight(name, weight, bias)
        if lin.kind == "int8pack":  # no CUDA int8pack kernel in torch: dequantize to bf16 instead
            w = (lin.weight.float() * lin.aux[:, None]).to(self.lowbit_dtype)
            lin = QLinear("dense-bfloat16", lin.out_features, w, lin.bias)
        return lin

    def linears(self, x, ws):
        """``linear(x, w)`` for each of ``ws``; int4 weights of one group size run as one fused matmul."""
        if not self.fuse_linears or len(ws) < 2 or any(w.kind != "int4pack" or w.group != ws[0].group for w in ws):
            return tuple(self.linear(x, w) for w in ws)
        key = tuple(id(w) for w in ws)
        fused = self._fused.get(key, (None, None))[1]
        if fused is None:
            bias = None
            if any(w.bias is not None for w in ws):
                bias = torch.cat([torch.zeros(w.out_features, device=self.device, dtype=self.dtype)
                                  if w.bias is None else w.bias for w in ws])
            fused = QLinear("int4pack", sum(w.out_features for w in ws), torch.cat([w.weight for w in ws]), bias,
                            ws[0].group, torch.cat([w.aux for w in ws], dim=1))
            self._fused[key] = (ws, fused)
        return self.linear(x, fused).split([w.out_features for w in ws], dim=-1)

    def _int4_linear(self, qt, bias):
        group = self._int4_group(qt)
        n_in = qt.shape[1]
        if qt.shape[0] % 8 or n_in % (_INNER_K_TILES * 16):
            w = self._dense(qt, self.lowbit_dtype)
            return QLinear("dense-bfloat16", qt.shape[0], w, bias)
        q = qt.qweight.to(self.device)
        nibbles = (q & 15) << 4 | q >> 4  # ours holds element 2k in the low nibble, the kernel wants it high
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), _INNER_K_TILES)
        sz = self._int4_scales_zeros(qt, group).to(self.device, torch.bfloat16)
        return QLinear("int4pack", qt.shape[0], packed, bias, group, sz)

    def _int4_mm(self, x2, w):
        return torch.ops.aten._weight_int4pack_mm(x2, w.weight, w.group, w.aux)

    def synchronize(self):
        torch.cuda.synchronize(self.device)


def probe() -> dict:
    """Present when torch sees a CUDA device; the reason names what is missing otherwise."""
    if not torch.backends.cuda.is_built():
        return {"present": False, "reason": f"torch {torch.__version__} is built without CUDA",
                "device": {}, "features": {"torch": torch.__version__}}
    if not torch.cuda.is_available():
        return {"present": False, "reason": "no CUDA device visible to torch (driver or GPU absent)",
                "device": {}, "features": {"torch": torch.__version__, "cuda": torch.version.cuda}}
    props = torch.cuda.get_device_properties(0)
    return {
        "present": True,
        "reason": f"CUDA device {props.name}",
        "device": {"name": props.name, "memory_bytes": props.total_memory, "sm": f"{props.major}.{props.minor}",
                   "multiprocessors": props.multi_processor_count, "count": torch.cuda.device_count()},
        "features": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "bf16": torch.cuda.is_bf16_supported(), "int4pack_mm": props.major >= 8},
    }


if __name__ == "__main__":
    print(json.dumps(probe(), indent=2))
    sys.exit(0)
