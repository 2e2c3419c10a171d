"""The llmopt packed weight format: one layout read by every backend (CPU, Vulkan, NPU, CUDA).

A quantized 2-D weight ``W[out, in]`` with ``bits`` in {2, 3, 4, 5, 6, 8} and group size ``group`` (``group == in``
means one group per row, i.e. per output channel) is stored as three safetensors entries:

- ``<name>.qweight``  uint8 ``[out, in * bits / 8]``: each row is a little-endian bit stream; element ``j`` of a
  row occupies bits ``j*bits .. j*bits+bits-1`` (LSB first). For 4 bits, byte k holds element 2k in its low
  nibble and 2k+1 in its high nibble. Rows are whole 32-bit words (``in * bits % 32 == 0``), so shaders may read
  them as ``uint`` arrays.
- ``<name>.scales``   float16 or bfloat16 ``[out, in / group]``.
- ``<name>.zeros``    same dtype as scales, ``[out, in / group]``; present only when asymmetric.

Dequantization: ``W[r, j] = (q[r, j] - z[r, j // group]) * s[r, j // group]`` with ``q`` unsigned in
``[0, 2**bits - 1]``; for symmetric tensors the zero point is the constant ``2**(bits-1)``.

The file's ``__metadata__`` holds ``llmopt.format`` (version) and ``llmopt.quant``: a JSON object mapping each
quantized tensor name to ``{bits, group, sym, scale_dtype, orig_dtype, shape}``. Tensors not listed there
(norms, biases, unquantized weights) are stored as they are. docs/FORMAT.md is the prose version of this page.

    python -m llmopt.quant.format FILE.safetensors   # prints each tensor's scheme and size
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmopt.errors import LlmoptError

FORMAT_VERSION = "1"
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class QuantizedTensor:
    """A weight in the packed format; see the module docstring for the exact layout."""

    qweight: torch.Tensor  # uint8 [out, in*bits/8]
    scales: torch.Tensor  # fp16/bf16 [out, in/group]
    zeros: torch.Tensor | None  # like scales, or None when symmetric
    bits: int
    group: int
    shape: tuple[int, int]
    orig_dtype: str = "float32"

    @property
    def sym(self) -> bool:
        return self.zeros is None

    @property
    def nbytes(self) -> int:
        extra = 0 if self.zeros is None else self.zeros.numel() * self.zeros.element_size()
        return self.qweight.numel() + self.scales.numel() * self.scales.element_size() + extra

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    def meta(self) -> dict:
        return {
            "bits": self.bits,
            "group": self.group,
            "sym": self.sym,
            "scale_dtype": str(self.scales.dtype).removeprefix("torch."),
            "orig_dtype": self.orig_dtype,
            "shape": list(self.shape),
        }

    def unpacked(self) -> torch.Tensor:
        """The unsigned integer codes, uint8 ``[out, in]``."""
        return unpack_bits(self.qweight, self.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out, in]`` this tensor encodes."""
        out, n_in = self.shape
        q = self.unpacked().to(torch.float32).view(out, n_in // self.group, self.group)
        zero = float(2 ** (self.bits - 1)) if self.zeros is None else self.zeros.float().unsqueeze(-1)
        return ((q - zero) * self.scales.float().unsqueeze(-1)).view(out, n_in).to(dtype)


def check_layout(shape: tuple[int, int], bits: int, group: int, name: str = "tensor") -> None:
    """Raise LlmoptError unless ``shape`` can be stored with ``bits`` and ``group``."""
    if bits not in SUPPORTED_BITS:
        raise LlmoptError(f"{name}: bits={bits} is not supported (expected one of {SUPPORTED_BITS})")
    if len(shape) != 2:
        raise LlmoptError(f"{name}: only 2-D weights can be packed, got shape {tuple(shape)}")
    n_in = shape[1]
    if group <= 0 or n_in % group:
        raise LlmoptError(f"{name}: input width {n_in} is not divisible by group size {group}")
    if (n_in * bits) % 32:
        raise LlmoptError(f"{name}: a row of {n_in} x {bits}-bit codes is not a whole number of 32-bit words")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``[out, in]`` (each < 2**bits) into the row bit streams, uint8 ``[out, in*bits/8]``."""
    codes = codes.to(torch.uint8)
    out, n_in = codes.shape
    if bits == 8:
        return codes.contiguous()
    if bits in (2, 4):
        per_byte = 8 // bits
        c = codes.view(out, n_in // per_byte, per_byte).to(torch.int32)
        shifts = torch.arange(per_byte, dtype=torch.int32) * bits
        return (c << shifts).sum(-1).to(torch.uint8)
    arr = codes.numpy()
    bit_planes = (arr[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # LSB first
    packed = np.packbits(bit_planes.reshape(out, n_in * bits), axis=-1, bitorder="little")
    return torch.from_numpy(packed)


def unpack_bits(packed: torch.Tensor, bits: int, n_in: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 ``[out, n_in]`` codes."""
    out = packed.shape[0]
    if bits == 8:
        return packed
    if bits in (2, 4):
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.int32) * bits
        return ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)).to(torch.uint8).view(out, n_in)
    flat = np.unpackbits(packed.numpy(), axis=-1, bitorder="little").reshape(out, n_in, bits)
    codes = (flat.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(-1, dtype=np.uint8)
    return torch.from_numpy(codes)


def save_packed(path: str | Path, tensors: dict[str, QuantizedTensor | torch.Tensor], metadata: dict | None = None) -> None:
    """Write a packed safetensors file atomically. ``metadata`` adds string entries to ``__metadata__``."""
    from safetensors.torch import save_file

    from llmopt.fsutil import atomic_path

    flat: dict[str, torch.Tensor] = {}
    quant_meta: dict[str, dict] = {}
    for name, t in tensors.items():
        if isinstance(t, QuantizedTensor):
            flat[f"{name}.qweight"] = t.qweight.contiguous()
            flat[f"{name}.scales"] = t.scales.contiguous()
            if t.zeros is not None:
                flat[f"{name}.zeros"] = t.zeros.contiguous()
            quant_meta[name] = t.meta()
        else:
            flat[name] = t.contiguous()
    meta = {"llmopt.format": FORMAT_VERSION, "llmopt.quant": json.dumps(quant_meta, sort_keys=True)}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=meta)


def load_packed(path: str | Path) -> dict[str, QuantizedTensor | torch.Tensor]:
    """Read a packed (or plain) safetensors file into tensors and QuantizedTensors, checking every layout."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise LlmoptError(f"{path}: file not found") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise LlmoptError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        quant_meta = json.loads(meta.get("llmopt.quant", "{}"))
    except json.JSONDecodeError:
        raise LlmoptError(f"{path}: metadata 'llmopt.quant' is not valid JSON") from None
    result: dict[str, QuantizedTensor | torch.Tensor] = {}
    for name, m in quant_meta.items():
        try:
            qt = QuantizedTensor(
                qweight=raw.pop(f"{name}.qweight"),
                scales=raw.pop(f"{name}.scales"),
                zeros=raw.pop(f"{name}.zeros", None),
                bits=int(m["bits"]),
                group=int(m["group"]),
                shape=(int(m["shape"][0]), int(m["shape"][1])),
                orig_dtype=str(m.get("orig_dtype", "float32")),
            )
        except KeyError as err:
            raise LlmoptError(f"{path}: quantized tensor '{name}' lacks {err.args[0]}") from None
        _validate(qt, f"{path}: {name}")
        result[name] = qt
    result.update(raw)
    return result


def _validate(qt: QuantizedTensor, where: str) -> None:
    check_layout(qt.shape, qt.bits, qt.group, where)
    out, n_in = qt.shape
    expect_q = (out, n_in * qt.bits // 8)
    expect_s = (out, n_in // qt.group)
    if qt.qweight.dtype != torch.uint8 or tuple(qt.qweight.shape) != expect_q:
        raise LlmoptError(f"{where}.qweight: expected uint8 {expect_q}, got {qt.qweight.dtype} {tuple(qt.qweight.shape)}")
    if qt.scales.dtype not in _SCALE_DTYPES.values() or tuple(qt.scales.shape) != expect_s:
        raise LlmoptError(f"{where}.scales: expected float16/bfloat16 {expect_s}, got {qt.scales.dtype} {tuple(qt.scales.shape)}")
    if qt.zeros is not None and (qt.zeros.dtype != qt.scales.dtype or tuple(qt.zeros.shape) != expect_s):
        raise LlmoptError(f"{where}.zeros: expected {qt.scales.dtype} {expect_s}, got {qt.zeros.dtype} {tuple(qt.zeros.shape)}")


def main(argv: list[str] | None = None) -> int:
    for path in argv if argv is not None else sys.argv[1:]:
        for name, t in sorted(load_packed(path).items()):
            if isinstance(t, QuantizedTensor):
                kind = f"int{t.bits} g{t.group} {'sym' if t.sym else 'asym'} {t.bits_per_weight:.2f} bpw"
                print(f"{name:60s} {str(list(t.shape)):16s} {kind}")
            else:
                print(f"{name:60s} {str(list(t.shape)):16s} {str(t.dtype).removeprefix('torch.')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
