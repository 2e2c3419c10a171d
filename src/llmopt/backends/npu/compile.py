"""The compile stage for ``npu`` and ``iree-cpu``: render the kernels in ``kernels/`` and compile them with IREE.

With the iree-amd-aie compiler plugin present the modules target the NPU (``amd-aie``, npu1_4col); otherwise
(IREE from PyPI has no AIE backend) the same MLIR is compiled for ``llvm-cpu``. Every module the CPU can run is
then checked against the float64 torch reference (``reference.py``) on fresh random inputs, and the manifest
records the error. A kernel that fails to compile is recorded with the compiler's first error line and the
others go on.

Compiled modules are cached by content (rendered source, target, flags, compiler version) under
``$LLMOPT_CACHE/iree`` (default ``~/.cache/llmopt/iree``), so the backend and the tests compile each shape once.

    python -m llmopt.backends.npu.compile --target iree-cpu --out results/kernels/iree-cpu [--model config.json]

Environment for the NPU compiler (docs/NPU.md): ``LLMOPT_IREE_AIE_COMPILE`` (an ``iree-compile`` built with the
iree-amd-aie plugin), ``PEANO_INSTALL_DIR`` (llvm-aie), ``LLMOPT_IREE_AIE_INSTALL`` (its install dir).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from llmopt.backends.npu.kernels import DEFAULT_KERNEL_DIR, KernelSpec, render, source_hash
from llmopt.errors import LlmoptError
from llmopt.fsutil import atomic_path, write_json

LLVM_CPU_FLAGS = ["--iree-opt-level=O3", "--iree-llvmcpu-target-cpu=host"]  # FACTS §6: O3 is ~10x
AIE_FLAGS = ["--iree-hal-target-backends=amd-aie", "--iree-amdaie-target-device=npu1_4col",
             "--iree-amdaie-lower-to-aie-pipeline=objectFifo", "--iree-amdaie-tile-pipeline=pack-peel",
             "--iree-hal-memoization=false", "--iree-hal-indirect-command-buffers=false"]


def cache_dir() -> Path:
    return Path(os.environ.get("LLMOPT_CACHE", Path.home() / ".cache" / "llmopt")) / "iree"


@functools.cache
def toolchain() -> dict:
    """What can compile here: the PyPI IREE compiler's version and targets, and the iree-amd-aie plugin if any."""
    info = {"iree_compiler": None, "targets": [], "amd_aie": False, "aie_compile": None,
            "peano": os.environ.get("PEANO_INSTALL_DIR"), "missing": []}
    try:
        import iree.compiler as ic

        info["iree_compiler"] = importlib.metadata.version("iree-base-compiler")
        info["targets"] = sorted(ic.query_available_targets())
    except Exception as err:  # ImportError, or a broken install
        info["missing"].append(f"IREE compiler (pip install iree-base-compiler: {err})")
    aie = os.environ.get("LLMOPT_IREE_AIE_COMPILE") or shutil.which("iree-compile-amd-aie")
    if "amd-aie" in info["targets"]:
        info["amd_aie"], info["aie_compile"] = True, "iree.compiler"
    elif aie:
        try:
            listed = subprocess.run([aie, "--iree-hal-list-target-backends"], capture_output=True, text=True,
                                    timeout=60).stdout
            if "amd-aie" in listed:
                info["amd_aie"], info["aie_compile"] = True, aie
            else:
                info["missing"].append(f"{aie} does not list the amd-aie target backend")
        except (OSError, subprocess.SubprocessError) as err:
            info["missing"].append(f"LLMOPT_IREE_AIE_COMPILE={aie} does not run ({err})")
    else:
        info["missing"].append("iree-amd-aie compiler plugin (not on PyPI: build nod-ai/iree-amd-aie, then set "
                               "LLMOPT_IREE_AIE_COMPILE to its iree-compile)")
    if info["amd_aie"] and not info["peano"]:
        info["missing"].append("Peano (llvm-aie) for the AIE cores: set PEANO_INSTALL_DIR")
    return info


@dataclass
class Compiled:
    spec: KernelSpec
    target: str  # llvm-cpu or amd-aie
    path: Path  # the .vmfb
    key: str
    seconds: float  # compile time, 0 when cached
    artifacts: Path | None = None  # amd-aie: per-dispatch xclbin + instruction files


def _first_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "error:" in ln:
            return ln[ln.index("error:"):][:300]
    return (lines[0] if lines else "no diagnostic")[:300]


def compile_module(spec: KernelSpec, target: str = "llvm-cpu", kernel_dir: Path = DEFAULT_KERNEL_DIR,
                   cache: Path | None = None, prebuilt: Path | None = None) -> Compiled:
    """Compile one kernel at one shape, or take it from ``prebuilt`` (a compile-stage folder) or the cache.

    Raises LlmoptError naming the kernel and the compiler's first error line."""
    tc = toolchain()
    if tc["iree_compiler"] is None:
        raise LlmoptError(f"kernel {spec.label}: {tc['missing'][0]}")
    text = render(spec, kernel_dir)
    flags = LLVM_CPU_FLAGS if target == "llvm-cpu" else AIE_FLAGS + _aie_paths()
    if target not in ("llvm-cpu", "amd-aie"):
        raise LlmoptError(f"kernel {spec.label}: unknown compile target '{target}' (llvm-cpu or amd-aie)")
    if target == "amd-aie" and not tc["amd_aie"]:
        raise LlmoptError(f"kernel {spec.label}: cannot target the NPU: {'; '.join(tc['missing'])}")
    key = source_hash(text, target, flags, tc["iree_compiler"] + (tc["aie_compile"] or ""))
    cache = cache or cache_dir()
    path = cache / f"{spec.label}-{target}-{key}.vmfb"
    artifacts = path.with_suffix(".artifacts") if target == "amd-aie" else None
    if prebuilt is not None and (Path(prebuilt) / path.name).exists():
        path = Path(prebuilt) / path.name
        return Compiled(spec, target, path, key, 0.0, path.with_suffix(".artifacts") if artifacts else None)
    if path.exists():
        return Compiled(spec, target, path, key, 0.0, artifacts)
    t0 = time.perf_counter()
    if target == "llvm-cpu":
        import iree.compiler as ic

        try:
            blob = ic.compile_str(text, target_backends=["llvm-cpu"], extra_args=flags)
        except ic.CompilerToolError as err:
            raise LlmoptError(f"kernel {spec.label}: llvm-cpu compile failed: {_first_error(str(err))}") from None
        with atomic_path(path) as tmp:
            tmp.write_bytes(blob)
    else:
        _compile_aie(spec, text, flags, path, artifacts, tc["aie_compile"])
    return Compiled(spec, target, path, key, time.perf_counter() - t0, artifacts)


def _aie_paths() -> list[str]:
    out = []
    if os.environ.get("PEANO_INSTALL_DIR"):
        out.append(f"--iree-amd-aie-peano-install-dir={os.environ['PEANO_INSTALL_DIR']}")
    if os.environ.get("LLMOPT_IREE_AIE_INSTALL"):
        out.append(f"--iree-amd-aie-install-dir={os.environ['LLMOPT_IREE_AIE_INSTALL']}")
    return out


def _compile_aie(spec: KernelSpec, text: str, flags: list[str], path: Path, artifacts: Path, compiler: str) -> None:
    """Compile for the NPU; the per-dispatch xclbin and instruction files (what pyxrt loads) go to ``artifacts``."""
    with atomic_path(artifacts) as art_tmp:
        art_tmp.mkdir()
        src = art_tmp / f"{spec.kernel}.mlir"
        src.write_text(text)
        with atomic_path(path) as tmp:
            cmd = [compiler, str(src), *flags, f"--iree-hal-dump-executable-files-to={art_tmp}", "-o", str(tmp)]
            if compiler == "iree.compiler":
                cmd[0] = "iree-compile"
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            except (OSError, subprocess.SubprocessError) as err:
                raise LlmoptError(f"kernel {spec.label}: amd-aie compile did not run ({err})") from None
            if proc.returncode:
                raise LlmoptError(f"kernel {spec.label}: amd-aie compile failed: {_first_error(proc.stderr)}")


# --- which shapes to build ---------------------------------------------------------------------------

def self_test_specs() -> list[KernelSpec]:
    """One small shape per kernel and variant (GQA ratios 5 and 7 included: Qwen 14B and 7B) that proves the
    toolchain builds (and, on the CPU, computes) each one."""
    mk = KernelSpec.make
    return [
        mk("qgemv", N=64, K=256, G=64, BITS=4), mk("qgemm", N=64, K=256, G=64, BITS=4),
        mk("qgemv", N=32, K=128, G=32, BITS=4, ASYM=True, SCALE="bfloat16", BIAS=True),
        mk("qgemm", N=32, K=128, G=32, BITS=4, ASYM=True, SCALE="bfloat16", BIAS=True),
        mk("qgemv", N=32, K=128, G=32, BITS=2), mk("qgemv", N=32, K=128, G=128, BITS=8),
        mk("qgemv", N=64, K=256, G=64, BITS=4, ROWS=1), mk("qgemm", N=64, K=256, G=64, BITS=4, ROWS=16),
        mk("attention", HQ=4, HKV=2, D=32, SCALE=32 ** -0.5), mk("attention", HQ=14, HKV=2, D=32, SCALE=0.2),
        mk("attention", HQ=4, HKV=1, D=32, SCALE=0.125, SOFTCAP=50.0),
        mk("sliding_window_attention", HQ=4, HKV=2, D=32, SCALE=32 ** -0.5, WINDOW=8, SOFTCAP=50.0),
        mk("rope_attention", HQ=4, HKV=2, D=32, SCALE=32 ** -0.5), mk("rope_attention", HQ=10, HKV=2, D=32, SCALE=0.2),
        mk("gated_ffn", H=64, F=128, G=32, BITS=4, ACT="gelu_tanh"),
        mk("gated_ffn", H=64, F=128, G=32, BITS=4, ACT="silu"),
        mk("vl_patch_merger", C=32, DOUT=48),
    ]


def specs_for_model(config: dict, quant: dict) -> list[KernelSpec]:
    """The kernels one model needs: a qgemv and a qgemm per distinct linear shape, attention per layer kind.

    ``config`` is the model's config.json, ``quant`` ``{"bits", "group", "sym", "scale_dtype"}`` of its linears."""
    from llmopt.engine.config import ModelArgs

    a = ModelArgs.from_hf(config)
    bits, group = int(quant.get("bits", 4)), int(quant.get("group", 128))
    common = {"G": group, "BITS": bits, "SCALE": quant.get("scale_dtype", "float16"), "ASYM": not quant.get("sym", True)}
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    shapes = {(q, a.hidden, a.qkv_bias), (kv, a.hidden, a.qkv_bias), (a.hidden, q, False), (a.ffn, a.hidden, False),
              (a.hidden, a.ffn, False)}
    specs = []
    for n, k, bias in sorted(shapes):
        g = min(group, k) if k % min(group, k) == 0 else k
        for kernel in ("qgemv", "qgemm"):
            specs.append(KernelSpec.make(kernel, N=n, K=k, **{**common, "G": g}, BIAS=bias))
    attn = {"HQ": a.n_heads, "HKV": a.n_kv_heads, "D": a.head_dim, "SCALE": a.attn_scale, "SOFTCAP": a.attn_softcap or 0.0}
    specs.append(KernelSpec.make("attention", **attn))
    for w in sorted({w for w in a.windows if w}):
        specs.append(KernelSpec.make("sliding_window_attention", **attn, WINDOW=w))
    return specs


def models_from_registry(config: dict | str | Path | None = None) -> list[dict]:
    """``compile_kernels``' ``models`` for a workflow config: each selected model's config.json at the configured
    scale (pip-gguf models are real, so their full architecture) with each fixed-width scheme of ``run_schemes``
    (bits, group, sym, scale_dtype; mixed-width schemes compile on first use in the backend instead). A model
    whose config cannot be built comes back as ``{"model", "error"}``."""
    import transformers

    from llmopt import registry
    from llmopt.download.synthetic import FAMILIES, architecture

    reg = registry.load(config)
    scale = reg.config.get("scale", "tiny")
    quants = [s for s in reg.schemes.values() if s.get("bits") in (2, 4, 8)]
    out = []
    for model_id, entry in reg.models.items():
        if "architecture" not in entry or scale not in ("tiny", "full") or not quants:
            continue
        try:  # pip-gguf models are real at every scale: their shapes are the full architecture
            if entry.get("family") not in FAMILIES:
                raise LlmoptError(f"models.yaml: {model_id}: family {entry.get('family')!r} has no config class")
            config_cls = getattr(transformers, FAMILIES[entry["family"]][0])  # the config only: no model import
            cfg = config_cls(**architecture(entry, "full" if entry.get("source") == "pip-gguf" else scale)).to_dict()
        except (LlmoptError, TypeError, ValueError) as err:  # recorded by compile_kernels; the others go on
            out.append({"model": model_id, "error": str(err)})
            continue
        out += [{"model": model_id, "config": cfg, "quant": q} for q in quants]
    return out


# --- the stage ---------------------------------------------------------------------------------------

def compile_kernels(kernel_dir: Path, out_dir: Path, probe: dict, target: str,
                    models: list[dict] | None = None, check: bool = True) -> dict:
    """Compile every kernel (self-test shapes plus each model's shapes) into ``out_dir``; returns the manifest.

    ``models``: ``[{"model": id, "config": config.json dict, "quant": {bits, group, sym, scale_dtype}}]``; None
    takes them from the default workflow config (``models_from_registry()``), ``[]`` builds the self-test only.
    Never raises for one kernel's failure: it is recorded (``status: failed``, the compiler's first error line)."""
    from tqdm import tqdm

    if target not in ("npu", "iree-cpu"):
        raise LlmoptError(f"compile_kernels: target '{target}' is not an IREE target (expected npu or iree-cpu)")
    tc = toolchain()
    manifest = {"target": target, "toolchain": tc, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                "probe": {"present": probe.get("present"), "reason": probe.get("reason")}, "kernels": []}
    if tc["iree_compiler"] is None:
        manifest.update(skipped=True, reason=tc["missing"][0])
        _write(out_dir, manifest, [])
        return manifest
    if target == "npu" and tc["amd_aie"]:
        manifest["device_target"] = "amd-aie"
    else:
        manifest["device_target"] = "llvm-cpu"
        if target == "npu":
            manifest["note"] = ("no NPU compiler: the NPU kernels were compiled for llvm-cpu and checked on the CPU; "
                                "missing: " + "; ".join(tc["missing"]))
    specs = self_test_specs()
    if models is None:
        try:
            models = models_from_registry()
        except LlmoptError as err:
            models = []
            manifest["model_errors"] = [{"model": "registry", "error": str(err)}]
    manifest["models"] = sorted({m.get("model") for m in models})
    for m in models:
        try:
            if "error" in m:
                raise LlmoptError(m["error"])
            specs += specs_for_model(m["config"], m.get("quant") or {})
        except (LlmoptError, KeyError, TypeError, ValueError) as err:
            manifest.setdefault("model_errors", []).append({"model": m.get("model"), "error": str(err)})
    if manifest["device_target"] == "amd-aie":  # AIE kernels are static: decode rows 1, prefill in row buckets
        specs = [_static_rows(s) for s in specs]
    specs = list(dict.fromkeys(specs))
    files = []
    for spec in tqdm(specs, desc=f"compile {target}", unit="kernel"):
        entry = spec.as_dict() | {"label": spec.label}
        try:
            c = compile_module(spec, manifest["device_target"], Path(kernel_dir))
            entry.update(status="ok", file=c.path.name, key=c.key, compile_s=round(c.seconds, 3))
            files.append(c.path)
            if c.artifacts:
                files.append(c.artifacts)
            if check and c.target == "llvm-cpu":
                entry["check"] = check_module(c)
        except LlmoptError as err:
            entry.update(status="failed", error=str(err))
        manifest["kernels"].append(entry)
    manifest["ok"] = sum(e["status"] == "ok" for e in manifest["kernels"])
    manifest["failed"] = sum(e["status"] == "failed" for e in manifest["kernels"])
    _write(out_dir, manifest, files)
    return manifest


NPU_PREFILL_ROWS = 64  # prefill on the NPU runs in buckets of this many rows (padded)


def _static_rows(spec: KernelSpec) -> KernelSpec:
    if spec.kernel not in ("qgemv", "qgemm") or "ROWS" in spec.p:
        return spec
    return KernelSpec.make(spec.kernel, **spec.p, ROWS=1 if spec.kernel == "qgemv" else NPU_PREFILL_ROWS)


def check_module(c: Compiled, seed: int | None = None) -> dict:
    """Run a CPU-compiled kernel on fresh random inputs (``seed``: None draws one) against the float64 reference."""
    from llmopt.backends.npu.reference import case, compare
    from llmopt.backends.npu.runtime import IreeModule

    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    inputs, expected, tol = case(c.spec, seed=seed)
    got = IreeModule(c.path)(*inputs)
    return compare(got, expected, tol) | {"seed": seed}


def _write(out_dir: Path, manifest: dict, files: list[Path]) -> None:
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for f in files:
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        write_json(tmp / "manifest.json", manifest)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=("iree-cpu", "npu"), default="iree-cpu", help="which target's kernels")
    ap.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically)")
    ap.add_argument("--kernels", type=Path, default=DEFAULT_KERNEL_DIR, help="folder of the MLIR templates")
    ap.add_argument("--model", type=Path, action="append", default=[],
                    help="a model's config.json whose shapes to compile (repeatable; int4 g128 symmetric); "
                    "default: the models and schemes of config/config.yaml at its scale")
    args = ap.parse_args(argv)
    from llmopt.backends import probe

    models = [{"model": str(p), "config": json.loads(p.read_text()), "quant": {"bits": 4, "group": 128}} for p in args.model]
    m = compile_kernels(args.kernels, args.out, probe(args.target), args.target, models=models or None)
    for e in m["kernels"]:
        extra = e.get("error") or (f"max err {e['check']['max_abs_err']:.2e}" if "check" in e else "")
        print(f"{e['status']:6s} {e['label']:70s} {extra}")
    print(f"{m.get('ok', 0)} ok, {m.get('failed', 0)} failed -> {args.out}/manifest.json")
    return 0 if not m.get("failed") else 1


if __name__ == "__main__":
    sys.exit(main())
