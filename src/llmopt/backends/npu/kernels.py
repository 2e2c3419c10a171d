"""The NPU kernel catalogue: which MLIR templates exist under ``kernels/``, their parameters, and how to render one.

A kernel file is MLIR (linalg/arith on tensors, one ``func.func @main``) with three kinds of template marks:

- ``${NAME}``: replaced by a parameter or a value derived from them (shapes are static per compiled module;
  the token count stays dynamic (``?``) where IREE handles it well, or static with ``ROWS``: docs/NPU.md).
- a line ending in ``// @if FLAG`` (or ``!FLAG``, or ``A && !B``) is kept only when the condition holds;
  lines ``// @if FLAG`` ... ``// @endif`` do the same for a block.
- ``// @include OTHER as @fn with K=V ...`` inserts kernel OTHER rendered with this kernel's parameters
  (overridden by ``K=V``) as ``func.func private @fn``; IREE inlines the calls.

    python -m llmopt.backends.npu.kernels qgemv N=64 K=128 G=32 BITS=4   # prints the rendered MLIR
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path

from llmopt.errors import LlmoptError

DEFAULT_KERNEL_DIR = Path(__file__).resolve().parents[4] / "kernels"
QGEMM_MIN_ROWS = 8  # rows (tokens x batch) from which a quantized linear uses qgemm, not qgemv (bench/npu_*)


def _f(v: float) -> str:
    return f"{float(v):.9e}"  # MLIR float literals need a '.'


def _quant(p: dict, who: str) -> dict:
    n, k, g, bits = int(p["N"]), int(p["K"]), int(p["G"]), int(p["BITS"])
    if bits not in (2, 4, 8):
        raise LlmoptError(f"kernel {who}: BITS={bits} is not supported (expected 2, 4 or 8; 3-bit rows cross bytes)")
    if g <= 0 or k % g:
        raise LlmoptError(f"kernel {who}: K={k} is not a multiple of the group size G={g}")
    if n <= 0 or (k * bits) % 8:
        raise LlmoptError(f"kernel {who}: shape N={n} K={k} cannot hold {bits}-bit packed rows")
    scale = p.get("SCALE", "float16")
    if scale not in ("float16", "bfloat16"):
        raise LlmoptError(f"kernel {who}: SCALE={scale!r} (expected 'float16' or 'bfloat16')")
    rows = p.get("ROWS")  # static token rows (the NPU needs static shapes); None = dynamic
    if rows is not None and int(rows) <= 0:
        raise LlmoptError(f"kernel {who}: ROWS={rows} must be positive")
    static = {"MX": "?", "MS": "%m", "DYN_M": "%m"} if rows is None else {"MX": int(rows), "MS": int(rows), "DYN_M": ""}
    return {**static, "N": n, "K": k, "G": g, "BITS": bits, "KB": k * bits // 8, "NG": k // g, "QT": f"i{bits}",
            "ST": "i16" if scale == "bfloat16" else "f16", "ZP": _f(2 ** (bits - 1)),
            "PACKED": bits < 8, "BF16": scale == "bfloat16", "ASYM": bool(p.get("ASYM", False)),
            "BIAS": bool(p.get("BIAS", False))}


def _heads(p: dict, who: str) -> dict:
    hq, hkv, d = int(p["HQ"]), int(p["HKV"]), int(p["D"])
    if hq <= 0 or hkv <= 0 or hq % hkv:
        raise LlmoptError(f"kernel {who}: HQ={hq} query heads are not a multiple of HKV={hkv} key/value heads")
    if d <= 0 or d % 2:
        raise LlmoptError(f"kernel {who}: head dim D={d} must be even")
    softcap = float(p.get("SOFTCAP") or 0.0)
    return {"HQ": hq, "HKV": hkv, "D": d, "R": hq // hkv, "HALF": d // 2, "SCALE": _f(p["SCALE"]),
            "SOFTCAP": _f(softcap), "CAPPED": softcap > 0}


def _window(p: dict, who: str) -> dict:
    out = _heads(p, who)
    window = int(p["WINDOW"])
    if window <= 0:
        raise LlmoptError(f"kernel {who}: WINDOW={window} must be positive")
    return {**out, "WINDOW": window, "WINDOW_M1": window - 1}


def _ffn(p: dict, who: str) -> dict:
    act = p.get("ACT", "silu")
    if act not in ("silu", "gelu_tanh"):
        raise LlmoptError(f"kernel {who}: ACT={act!r} (expected 'silu' or 'gelu_tanh')")
    h, f = int(p["H"]), int(p["F"])
    up, down = _quant({**p, "N": f, "K": h, "BIAS": False}, who), _quant({**p, "N": h, "K": f, "BIAS": False}, who)
    return {"H": h, "F": f, "HB": up["KB"], "HG": up["NG"], "FB": down["KB"], "FG": down["NG"], "ST": up["ST"],
            "ASYM": up["ASYM"], "SILU": act == "silu", "GELU_TANH": act == "gelu_tanh"}


def _merger(p: dict, who: str) -> dict:
    c, merge, dout = int(p["C"]), int(p.get("MERGE", 4)), int(p["DOUT"])
    if c <= 0 or merge <= 0 or dout <= 0:
        raise LlmoptError(f"kernel {who}: C, MERGE and DOUT must be positive")
    return {"C": c, "CF": _f(c), "MERGE": merge, "CM": c * merge, "DOUT": dout, "EPS": _f(p.get("EPS", 1e-6))}


_Q = ("SCALE", "ASYM", "BIAS", "ROWS")
# kernel -> (parameter check and derived values, required parameters, optional parameters)
KERNELS = {
    "qgemv": (_quant, ("N", "K", "G", "BITS"), _Q),
    "qgemm": (_quant, ("N", "K", "G", "BITS"), _Q),
    "attention": (_heads, ("HQ", "HKV", "D", "SCALE"), ("SOFTCAP",)),
    "sliding_window_attention": (_window, ("HQ", "HKV", "D", "SCALE", "WINDOW"), ("SOFTCAP",)),
    "rope_attention": (_heads, ("HQ", "HKV", "D", "SCALE"), ()),
    "gated_ffn": (_ffn, ("H", "F", "G", "BITS"), ("SCALE", "ASYM", "ACT")),
    "vl_patch_merger": (_merger, ("C", "DOUT"), ("MERGE", "EPS")),
}


@dataclass(frozen=True)
class KernelSpec:
    """One kernel at one set of parameters: what the compile stage builds and the cache is keyed by."""

    kernel: str
    params: tuple  # sorted (name, value) pairs

    @classmethod
    def make(cls, kernel: str, **params) -> "KernelSpec":
        spec = cls(kernel, tuple(sorted(params.items())))
        spec.values()  # validate now, not at compile time
        return spec

    @property
    def p(self) -> dict:
        return dict(self.params)

    def values(self) -> dict:
        if self.kernel not in KERNELS:
            raise LlmoptError(f"unknown kernel '{self.kernel}' (expected one of {', '.join(KERNELS)})")
        derive, required, optional = KERNELS[self.kernel]
        missing = [k for k in required if k not in self.p]
        if missing:
            raise LlmoptError(f"kernel {self.kernel}: missing parameter(s) {', '.join(missing)}")
        unknown = [k for k in self.p if k not in required and k not in optional]
        if unknown:
            raise LlmoptError(f"kernel {self.kernel}: unknown parameter(s) {', '.join(unknown)} "
                              f"(takes {', '.join(required + optional)})")
        try:
            return derive(self.p, self.kernel)
        except (TypeError, ValueError) as err:
            raise LlmoptError(f"kernel {self.kernel}: bad parameter value ({err})") from None

    @property
    def label(self) -> str:
        return self.kernel + "".join(f"-{k}{v}" for k, v in self.params)

    def as_dict(self) -> dict:
        return {"kernel": self.kernel, "params": self.p}


_IF = re.compile(r"\s*//\s*@if\s+(.+?)\s*$")
_INCLUDE = re.compile(r"^\s*//\s*@include\s+(\w+)\s+as\s+@(\w+)((?:\s+with)?(?:\s+\w+=\S+)*)\s*$")


def _holds(cond: str, flags: dict) -> bool:
    ok = True
    for term in cond.split("&&"):
        term = term.strip()
        neg = term.startswith("!")
        name = term.lstrip("!")
        if name not in flags:
            raise LlmoptError(f"template condition names unknown flag '{name}'")
        ok &= bool(flags[name]) != neg
    return ok


def render(spec: KernelSpec, kernel_dir: Path = DEFAULT_KERNEL_DIR) -> str:
    """The MLIR source of ``spec``: template marks resolved, ready for iree-compile."""
    values = spec.values()
    path = Path(kernel_dir) / f"{spec.kernel}.mlir"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LlmoptError(f"kernel {spec.kernel}: template {path} not found") from None
    try:
        text = string.Template(text).substitute({k: v for k, v in values.items() if not isinstance(v, bool)})
    except (KeyError, ValueError) as err:
        raise LlmoptError(f"{path}: template placeholder {err} has no value") from None
    flags = {k: v for k, v in values.items() if isinstance(v, bool)}
    out, stack = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if m := _INCLUDE.match(line):
            if all(stack):
                out.append(_include(spec, m, kernel_dir))
            continue
        if stripped.startswith("// @if "):
            stack.append(_holds(stripped[len("// @if "):], flags))
            continue
        if stripped == "// @endif":
            if not stack:
                raise LlmoptError(f"{path}:{lineno}: @endif without @if")
            stack.pop()
            continue
        m = _IF.search(line)
        if m and not stripped.startswith("//"):
            if all(stack) and _holds(m.group(1), flags):
                out.append(line[: m.start()].rstrip())
            continue
        if all(stack):
            out.append(line)
    if stack:
        raise LlmoptError(f"{path}: @if without @endif")
    return "\n".join(out) + "\n"


def _include(spec: KernelSpec, m: re.Match, kernel_dir: Path) -> str:
    other, fn, assigns = m.group(1), m.group(2), m.group(3).replace("with", " ").split()
    params = dict(spec.params)
    for a in assigns:
        key, _, val = a.partition("=")
        params[key] = int(val) if val.lstrip("-").isdigit() else val
    _, required, optional = KERNELS[other]
    sub = KernelSpec(other, tuple(sorted((k, v) for k, v in params.items() if k in required + optional)))
    text = render(sub, kernel_dir)
    if "func.func @main(" not in text:
        raise LlmoptError(f"kernel {other}: no func.func @main to include")
    return text.replace("func.func @main(", f"func.func private @{fn}(", 1)


def source_hash(text: str, target: str, flags: list[str], compiler: str) -> str:
    """Cache key of one compiled module: the rendered source, the target, the flags and the compiler version."""
    blob = json.dumps([text, target, flags, compiler])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        return 2
    params = {}
    for a in args[1:]:
        key, _, val = a.partition("=")
        params[key] = int(val) if val.isdigit() else val
    print(render(KernelSpec.make(args[0], **params)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
