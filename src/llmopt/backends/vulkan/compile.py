"""The Vulkan compile stage: GLSL compute shaders (``shaders/*.comp``) to SPIR-V with glslc, per target device.

    python -m llmopt.backends.vulkan.compile shaders/ results/kernels/vulkan [--probe results/targets/vulkan.json]

Naming rule (the workflow's outputs): one SPIR-V file per shader, ``{out_dir}/{stem}.spv`` for
``shaders/{stem}.comp`` (e.g. ``results/kernels/vulkan/matvec_quant.spv``), plus ``{out_dir}/manifest.json``; a shader
that includes ``chain.glsl`` also as ``{stem}_chain.spv`` (``CHAIN = 1``: its chained build for the replayed step).
The device variant is chosen here from the probe: the defines ``USE_SUBGROUP`` (subgroup arithmetic in compute
shaders, else shared-memory reductions) and ``SMALL_CODE`` (CPU devices: tile loops kept rolled) are compiled in, and the sizes the runtime passes as specialization
constants (workgroup size, rows per workgroup, matmul tile) are written to the manifest's ``spec``, and so is
which mat-vec the runtime uses: ``matvec_quant_idot`` (x quantized to int8, packed 4x8-bit integer dot products;
its SPIR-V is built everywhere, loaded only where used) when the probe says the device accelerates the packed
signed dot (NVIDIA does; lavapipe emulates it), else ``matvec_quant``. A shader is
rebuilt only when its source, an included header, its defines or glslc's version changed (the manifest keeps a
hash of each); ``check_manifest`` makes the runtime refuse missing or stale SPIR-V with the shader's name.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

from llmopt.errors import LlmoptError
from llmopt.fsutil import atomic_path, read_json, sha256_file, write_json

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)

MANIFEST = "manifest.json"
REPO_SHADERS = Path(__file__).resolve().parents[4] / "shaders"


def device_config(probe: dict) -> dict:
    """Per-device variant: defines and specialization-constant sizes, from the probe's device facts.

    ``wg``: invocations of elementwise and mat-vec/mat-mul workgroups; ``rows``: mat-vec rows a workgroup;
    ``tile``: mat-mul tile edge; ``wg_reduce``: invocations of the one-workgroup-a-row shaders (norms,
    attention, argmax), whose latency at batch 1 falls with more invocations in flight; ``matvec_min_groups``:
    a mat-vec halves its rows a workgroup until it has this many workgroups (short outputs such as k/v and
    down projections need them to keep a GPU's memory system busy); ``matvec_split``: invocations sharing one
    set of mat-vec rows (0: the whole workgroup; GPUs want one subgroup, see matvec_quant.comp);
    ``matvec_int_dot``: 1 to run int2/4/8 mat-vecs through ``matvec_quant_idot`` (x as int8, packed dot products),
    where the device runs the packed signed 4x8-bit dot product as a native instruction; ``matvec_wg_max``: a
    mat-vec over long rows doubles its workgroup up to this size while every invocation still gets two or more
    32-value chunks of a row (on an H200 the 18944-wide down projection ran 27.6 us at 128 invocations and 22.7 us
    at 256, while rows of 3584 were fastest at 64-128); ``matvec_x_q8``: 1 to have the ops that feed int-dot
    mat-vecs (norms, gated_act, the fused decode attention) also write their output as int8 per 32 values (x8.glsl),
    read by 4-bit mat-vecs instead of quantizing x in every workgroup; ``matvec_gated``: 1 to run gate/up and the
    gated activation as one mat-vec (``VulkanBackend.gated_linears``); ``matvec_gated_layout``: that mat-vec's
    (workgroup size, invocations a row set, rows a set), whose sets * rows / 2 outputs a workgroup are whole
    32-value chunks, so that it writes them as x8 rows for the down projection itself; ``matvec_norm``: 1 to fold the
    residual add and the next RMSNorm into the o and down mat-vecs (``VulkanBackend.linear_add_rmsnorm``; Gemma's
    sandwich norms too, ``linear_norm_add_rmsnorm``);
    ``matvec_norm_layout``: that mat-vec's (workgroup size, invocations a row set, rows a set), sets * rows outputs
    a workgroup, whole 32-value chunks; ``matvec_sandwich_layout``: the same for Gemma's sandwich fold
    (``linear_norm_add_rmsnorm``); ``decode_chain``: the replayed step's dispatches ordered by a counter instead
    of barriers (``llmopt.backends.vulkan.chain.MODES``); ``chain_early``: 32-value chunks of each row a chained
    mat-vec loads before it waits.

    CPU devices (lavapipe) run one invocation per SIMD lane group and pay for every barrier, so small workgroups
    (16 invocations, 8 rows each) win there by about 5x (FACTS §6); GPUs want 64-256 invocations a workgroup.
    """
    device = probe.get("device", {})
    features = probe.get("features", {})
    subgroup = int(device.get("subgroup_size") or 0)
    max_wg = int(device.get("max_workgroup_invocations") or 128)
    int_dot = int(bool(features.get("integer_dot_4x8_signed_accelerated")))
    if device.get("type") == "cpu":
        wg, rows, tile, wg_reduce, min_groups, split, wg_max = 16, 8, 16, 16, 1, 0, 16
        gated_layout = (64, 8, 8)  # 8 sets of 4 outputs
        norm_layout = sandwich_layout = (64, 8, 4)  # 8 sets of 4 outputs
    else:  # the fastest decode step measured on an H200 (bench/vulkan_decode.py, docs/benchmarks.md)
        wg, rows, tile, wg_reduce, min_groups, split, wg_max = 64, 4, 32, 1024, 256, 0, 256
        gated_layout = (256, 16, 4)  # 16 sets of 16 invocations, 2 outputs each
        norm_layout = (1024, 128, 4)  # 8 sets of 128 invocations, 4 outputs each
        sandwich_layout = (512, 128, 8)  # 4 sets of 128 invocations, 8 outputs each (v23; before: norm_layout's)
    # x8 rows with wg 64, rows 4: 1.38x / 1.27x decode on an H200 against wg 128, rows 16 without them; the gated
    # mat-vec writing x8 rows itself (no gated_act dispatch; 32 outputs a workgroup: gated_layout) 1.05x / 1.06x
    # more there; without its x8 rows (the down projection reading float x) it was slower than gated_act
    # the residual add and the next norm folded into the o and down mat-vecs (norm_layout, 8 sets of 128 invocations:
    # 112 workgroups for Qwen2.5-7B's 3584 outputs) 1.10-1.14x more on Qwen2.5-7B there (v16); Gemma's sandwich fold
    # (also 32 outputs a workgroup) in 4 sets of 8 rows in workgroups of 512: on an H100 Gemma 2 9B 1.02x, where
    # Qwen2.5-7B's plain fold in that layout was 0.97x (v23, 10 layouts swept); off where the device's workgroups
    # cannot hold the layouts
    x_q8, gated = int_dot, int_dot
    norm = int(bool(int_dot) and max_wg >= max(norm_layout[0], sandwich_layout[0]))
    # the replayed step's dispatches chained through a counter instead of barriers, each mat-vec's first chunk of
    # weights loaded before its wait (chain.py): on an H200 Qwen2.5-7B 1.05x, Gemma 2 9B 0.90x, so "auto" (off for
    # sandwich norms); lavapipe runs dispatches one after another, nothing to win there
    chain = "auto" if device.get("type") != "cpu" else "off"
    return {
        "defines": {"USE_SUBGROUP": int(bool(features.get("subgroup_arithmetic")) and subgroup > 0),
                    "SMALL_CODE": int(device.get("type") == "cpu")},
        "spec": {"wg": min(wg, max_wg), "rows": rows, "tile": tile, "wg_reduce": min(wg_reduce, max_wg),
                 "matvec_min_groups": min_groups, "matvec_split": split, "matvec_wg_max": min(wg_max, max_wg),
                 "matvec_int_dot": int_dot,
                 "matvec_x_q8": x_q8, "matvec_gated": gated,
                 "matvec_gated_layout": [min(gated_layout[0], max_wg), *gated_layout[1:]], "matvec_norm": norm,
                 "matvec_norm_layout": list(norm_layout), "matvec_sandwich_layout": list(sandwich_layout),
                 "decode_chain": chain, "chain_early": int(chain != "off")},
    }


def glslc_version() -> str:
    exe = shutil.which("glslc")
    if exe is None:
        raise LlmoptError("glslc not found on PATH (install Debian/Ubuntu package 'glslc' or the Vulkan SDK)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    return out.splitlines()[0].strip() if out else "unknown"


def included_headers(source: Path, found: set | None = None) -> set[Path]:
    """The headers ``source`` includes, transitively (every ``#include "..."`` counts, inside ``#if`` or not)."""
    found = set() if found is None else found
    for name in INCLUDE.findall(source.read_text()):
        header = source.parent / name
        if header not in found:
            if not header.is_file():
                raise LlmoptError(f"{source}: includes \"{name}\", which is not in {source.parent}")
            found.add(header)
            included_headers(header, found)
    return found


def source_hash(comp: Path, defines: dict) -> str:
    """Hash of what a SPIR-V file is built from: the .comp, the headers it includes, and the defines (so editing a
    header rebuilds only the shaders that include it)."""
    digest = hashlib.sha256(comp.read_bytes())
    for header in sorted(included_headers(comp)):
        digest.update(header.name.encode() + header.read_bytes())
    digest.update(repr(sorted(defines.items())).encode())
    return digest.hexdigest()


def builds(comps: list[Path], defines: dict) -> list[tuple[Path, str, dict]]:
    """(source, output stem, defines) of every SPIR-V file: each shader with the device's defines, and a shader that
    includes ``chain.glsl`` also as ``{stem}_chain`` with ``CHAIN = 1`` (chained replayed dispatches:
    ``llmopt.backends.vulkan.chain``)."""
    out = []
    for comp in comps:
        out.append((comp, comp.stem, defines))
        if any(h.name == "chain.glsl" for h in included_headers(comp)):
            out.append((comp, f"{comp.stem}_chain", {**defines, "CHAIN": 1}))
    return out


def compile_shaders(shader_dir: Path, out_dir: Path, probe: dict) -> dict:
    """Build ``{out_dir}/{stem}.spv`` for every ``{shader_dir}/*.comp`` that changed; write and return the manifest."""
    shader_dir, out_dir = Path(shader_dir), Path(out_dir)
    if not probe.get("present", False):
        raise LlmoptError(f"vulkan target absent, nothing to compile: {probe.get('reason', 'no reason recorded')}")
    comps = sorted(shader_dir.glob("*.comp"))
    if not comps:
        raise LlmoptError(f"{shader_dir}: no .comp shaders found")
    config = device_config(probe)
    version = glslc_version()
    defines = config["defines"]
    old = _read_manifest(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = {}
    for comp, stem, variant in builds(comps, defines):
        want = source_hash(comp, variant)
        spv = out_dir / f"{stem}.spv"
        prev = old.get("shaders", {}).get(stem, {})
        fresh = (prev.get("source_sha256") == want and old.get("glslc") == version and spv.exists()
                 and sha256_file(spv) == prev.get("spv_sha256"))
        if not fresh:
            _glslc(comp, spv, variant)
        entries[stem] = {"spv": spv.name, "source": str(comp), "source_sha256": want,
                         "spv_sha256": sha256_file(spv), "rebuilt": not fresh}
    manifest = {"target": "vulkan", "glslc": version, "defines": defines, "spec": config["spec"],
                "device": probe.get("device", {}).get("name"), "shaders": entries}
    write_json(out_dir / MANIFEST, manifest)
    return manifest


def check_manifest(spv_dir: Path, shader_dir: Path = REPO_SHADERS) -> dict:
    """The manifest of ``spv_dir`` after checking every shader's SPIR-V exists and matches its current source."""
    spv_dir, shader_dir = Path(spv_dir), Path(shader_dir)
    manifest = _read_manifest(spv_dir)
    if not manifest:
        raise LlmoptError(f"{spv_dir / MANIFEST}: missing; run the compile stage (llmopt.backends.vulkan.compile)")
    for comp, stem, variant in builds(sorted(shader_dir.glob("*.comp")), manifest["defines"]):
        entry = manifest["shaders"].get(stem)
        spv = spv_dir / f"{stem}.spv"
        if entry is None or not spv.exists():
            raise LlmoptError(f"{spv}: SPIR-V for shader '{stem}' is missing; rerun the compile stage")
        if entry["source_sha256"] != source_hash(comp, variant):
            raise LlmoptError(f"{spv}: stale, {comp} (or a header) changed since it was compiled; rerun the compile stage")
        if sha256_file(spv) != entry["spv_sha256"]:
            raise LlmoptError(f"{spv}: contents differ from the manifest's hash (edited or truncated); rerun the compile stage")
    return manifest


def _read_manifest(out_dir: Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return {}
    manifest = read_json(path)
    if not isinstance(manifest.get("shaders"), dict) or "defines" not in manifest:
        raise LlmoptError(f"{path}: not a vulkan shader manifest (expected keys 'shaders' and 'defines')")
    return manifest


def _glslc(comp: Path, spv: Path, defines: dict) -> None:
    args = [f"-D{k}={v}" for k, v in sorted(defines.items())]
    with atomic_path(spv) as tmp:
        cmd = ["glslc", "--target-env=vulkan1.1", "-O", *args, str(comp), "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise LlmoptError(f"{comp}: glslc failed: {' '.join(res.stderr.split())[:400]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shader_dir", type=Path, help="folder of .comp/.glsl sources (the repository's shaders/)")
    parser.add_argument("out_dir", type=Path, help="where {stem}.spv and manifest.json go")
    parser.add_argument("--probe", type=Path, help="probe JSON of the target (default: probe this machine now)")
    args = parser.parse_args(argv)
    try:
        if args.probe:
            probe = read_json(args.probe)
        else:
            from llmopt.backends.vulkan.device import probe as probe_now

            probe = probe_now()
        manifest = compile_shaders(args.shader_dir, args.out_dir, probe)
    except LlmoptError as err:
        print(f"llmopt: error: {err}", file=sys.stderr)
        return 2
    rebuilt = [k for k, v in manifest["shaders"].items() if v["rebuilt"]]
    print(f"{len(manifest['shaders'])} shaders for {manifest['device']}, rebuilt: {', '.join(rebuilt) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
