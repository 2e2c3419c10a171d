"""The quantize stage: a source model folder -> a packed model folder with ``quant.json``.

``quantize_model(source_dir, scheme, out_dir, model_entry)`` streams the source tensor by tensor (each read with
``safe_open``, quantized, handed to a shard writer), so peak memory is about one tensor plus one output shard
(plus the float model while calibrating, for calibrated methods, which need a real model). The output folder is
built under a temporary name and renamed into place only when complete: config.json, tokenizer and generation
files copied, packed ``model.safetensors`` (or shards + index), ``manifest.json``, and ``quant.json``:

    {"scheme": {...resolved...}, "method", "bytes", "orig_bytes", "params", "quantized_params",
     "bits_per_weight" (all stored bytes over all parameters), "quantized_bits_per_weight",
     "compression" (orig_bytes / bytes), "budget": {...} (mixed), "calibration": {...}, "tune": {...} (tune),
     "tensors": {name: {"format", "bits", "group", "sym", "shape", "bytes", "rel_error", "loss"?,
                        "rel_error_before_tune"?} | {"dtype", "bytes"}},
     "perplexity": {"float": {text: ppl}, "quant": {text: ppl}, "increase_pct": {text: %}, "protocol": {...}}
                   or {"skipped": reason},
     "time_s", "peak_rss_mb", "versions"}

``rel_error`` is ``||W - deq(Q(W))||_F / ||W||_F`` per tensor. Scheme keys: ``llmopt.quant.schemes``. With ``tune``
(end-to-end tuning of scales and zeros, ``llmopt.quant.tune``) the packed tensors are held in memory until tuned,
then written; the float model is resident while tuning.

    llmopt quantize SOURCE_DIR OUT_DIR --scheme w4g128      # the same from the command line
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from llmopt.errors import LlmoptError
from llmopt.fsutil import atomic_path, read_json, sha256_file, write_json
from llmopt.quant import io, schemes
from llmopt.quant.format import FORMAT_VERSION
from llmopt.quant.mixed import knapsack, tensor_loss
from llmopt.quant.quantizers import Spec, quantize, quantize_measured

_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
           "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
           "processor_config.json", "vocab.json", "merges.txt")
_FLOAT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def quantize_model(source_dir: Path, scheme: dict | str, out_dir: Path, model_entry: dict | None = None) -> dict:
    """Quantize the model folder ``source_dir`` with ``scheme`` into ``out_dir``; returns quant.json's content."""
    start = time.time()
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    scheme = schemes.resolve(scheme)
    if not (source_dir / "config.json").exists():
        raise LlmoptError(f"{source_dir}: not a model folder (config.json missing)")
    index = io.tensor_index(source_dir)
    real = is_real(source_dir)
    plan = _plan_formats(index, scheme)
    if scheme.get("tune"):
        _check_tunable(source_dir, index, scheme, real)
    stats = _calibrate(source_dir, scheme, plan, real)
    budget = None
    if scheme["method"] == "mixed":
        plan, budget = _choose_mixed(index, scheme, plan, stats, model_entry or {})
    base = scheme.get("base", scheme["method"])
    report: dict = {"tensors": {}}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name in _COPIED:
            if (source_dir / name).exists():
                shutil.copy2(source_dir / name, tmp / name)
        writer = io.ShardWriter(tmp, scheme["shard_bytes"], {"llmopt.scheme": scheme["name"]})
        held = {} if scheme.get("tune") else None  # tuning needs every packed tensor before any is written
        for name, (path, dtype, shape) in tqdm(index.items(), desc=f"quantize {scheme['name']}", unit="tensor"):
            w = io.read_tensor(path, name)
            spec = plan.get(name)
            if spec is None:
                t = w.to(_FLOAT[scheme["dtype"]]) if scheme["method"] == "none" and "dtype" in scheme and w.is_floating_point() else w
                report["tensors"][name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(shape),
                                           "bytes": t.numel() * t.element_size()}
            else:
                method = _method_for(base, name, stats)
                t, rel = quantize_measured(w, spec, method, name=name, importance=_diag(stats, "hessians", name),
                                           hessian=(stats.get("hessians") or {}).get(name), **_gptq_options(scheme, name))
                report["tensors"][name] = {"format": spec.label, "method": method, **t.meta(),
                                           "bytes": t.nbytes, "rel_error": rel}
                if budget and name in budget["losses"]:  # vocabulary tables fixed by `embedding` have no choice
                    report["tensors"][name]["loss"] = budget["losses"][name]
            if held is None:
                writer.add(name, t)
            else:
                held[name] = t
            del w, t
            _release_freed_memory()
        if held is not None:
            held, report["tune"] = _tune(source_dir, scheme, held, index, report["tensors"])
            for name, t in held.items():
                writer.add(name, t)
            del held
        files = writer.close()
        report.update(_summary(index, report["tensors"], scheme))
        report["perplexity"] = _perplexity(source_dir, tmp, scheme, real)
        if budget:
            report["budget"] = {k: v for k, v in budget.items() if k != "losses"}
        report["calibration"] = {k: v for k, v in stats.items() if k not in ("hessians", "fisher")}
        report["calibration"]["used_for"] = sorted(k for k in ("hessians", "fisher") if k in stats)
        report["scheme"] = scheme
        report["method"] = scheme["method"]
        report["format"] = FORMAT_VERSION
        report["time_s"] = round(time.time() - start, 2)
        report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        report["versions"] = {"torch": torch.__version__}
        write_json(tmp / "quant.json", report)
        write_json(tmp / "manifest.json", _manifest(source_dir, tmp, files, scheme))
    return report


def _release_freed_memory() -> None:
    """Return freed heap memory to the OS: glibc keeps large freed blocks once its mmap threshold has grown,
    so without this the resident size would creep up by every tensor's temporaries."""
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    if libc:
        ctypes.CDLL(libc).malloc_trim(0)


def is_real(folder: Path) -> bool:
    """Real (not synthetic) weights with a tokenizer: perplexity and calibration are meaningful."""
    manifest = folder / "manifest.json"
    source = read_json(manifest).get("source") if manifest.exists() else None
    return source != "synthetic" and (folder / "tokenizer.json").exists()


def _plan_formats(index: dict, scheme: dict) -> dict[str, Spec | None]:
    """The format of every quantizable tensor (for mixed: the first option, replaced later, except vocabulary
    tables that ``embedding`` fixes); checked up front."""
    if scheme["method"] == "none":
        return {}
    default = schemes.options(scheme) if scheme["method"] == "mixed" else [schemes.spec(scheme)]
    emb = schemes.embedding_spec(scheme)
    plan = {}
    for name, (path, dtype, shape) in index.items():
        if not schemes.is_quantizable(name, shape):
            continue
        specs = [emb] if emb and schemes.is_vocabulary_table(name) else default
        if not any(s.fits(shape) for s in specs):
            if scheme["on_indivisible"] == "keep":
                continue
            s = specs[0]
            raise LlmoptError(f"{path}: tensor '{name}' {list(shape)}: width {shape[1]} does not fit int{s.bits} "
                              f"group {s.group_for(shape[1])} (set on_indivisible: keep to store it in float)")
        plan[name] = next(s for s in specs if s.fits(shape))
    return plan


def _calibrate(source_dir: Path, scheme: dict, plan: dict, real: bool) -> dict:
    """Hessians (gptq; imatrix for mse) and Fisher (mixed) from calibration text, when the weights are real."""
    base = scheme.get("base", scheme["method"])
    sensitivity = scheme.get("sensitivity", "mse")
    if sensitivity == "auto":
        sensitivity = "fisher" if real else "mse"
    need_h = base == "gptq" or (base == "mse" and real) or sensitivity == "output"
    need_f = sensitivity == "fisher"
    if not plan or not (need_h or need_f):
        return {"sensitivity": sensitivity} if scheme["method"] == "mixed" else {}
    if not real:
        raise LlmoptError(f"{source_dir}: scheme '{scheme['name']}' needs calibration (gptq, output or fisher "
                          "sensitivity), which needs real weights and a tokenizer; this folder is synthetic")
    from llmopt.quant.calibration import calibration_windows, fisher_diagonal, input_hessians
    from llmopt.quant.perplexity import load_model

    cal = scheme["calibration"]
    key = (str(source_dir.resolve()), tuple(f.stat().st_mtime_ns for f in io.weight_files(source_dir)),
           tuple(cal["texts"]), cal["tokens"])
    cached = _STATS_CACHE.get(key, {})
    if (need_h and "hessians" not in cached) or (need_f and "fisher" not in cached):
        model, tok = load_model(source_dir)
        windows = calibration_windows(tok, cal["texts"], cal["tokens"])
        cached["tokens"] = sum(len(w) - 1 for w in windows)
        if need_h and "hessians" not in cached:
            cached["hessians"] = input_hessians(model, windows)
        if need_f and "fisher" not in cached:
            cached["fisher"] = fisher_diagonal(model, windows[:8])
        del model
        _STATS_CACHE.clear()  # one model's statistics at a time: they are as large as the model
        _STATS_CACHE[key] = cached
    stats = {"texts": cal["texts"], "tokens": cached["tokens"], "sensitivity": sensitivity}
    if need_h:
        stats["hessians"] = cached["hessians"]
    if need_f:
        stats["fisher"] = cached["fisher"]
        stats["fisher_windows"] = min(8, -(-cached["tokens"] // 512))
    return stats


def _gptq_options(scheme: dict, name: str) -> dict:
    """The quantizer's GPTQ keyword options for tensor ``name`` (none for schemes without gptq): a vocabulary table
    gets ``table_damp``, which may differ because the tied table's head Hessian ignores its input-embedding role."""
    opts = scheme.get("gptq")
    if not opts:
        return {}
    return {"damp": opts["table_damp"] if schemes.is_vocabulary_table(name) else opts["damp"]}


def _check_tunable(source_dir: Path, index: dict, scheme: dict, real: bool) -> None:
    """Fail before any work when ``tune`` cannot run: it needs real weights, a tokenizer and the memory."""
    from llmopt.quant.tune import check_fits

    if not real:
        raise LlmoptError(f"{source_dir}: scheme '{scheme['name']}' has tune, which needs real weights and a "
                          "tokenizer (it matches the float model's next-token distributions); this folder is synthetic")
    check_fits(sum(_numel(shape) for _, _, shape in index.values()), f"{source_dir} (scheme '{scheme['name']}')",
               rounding=scheme["tune"]["round_lr"] > 0)


def tune_windows(tokenizer, scheme: dict) -> list:
    """The calibration windows tuning steps through: GPTQ's calibration tokens cut into ``tune.tokens``-token
    windows (cycled when there are fewer than ``tune.steps``), or with ``windows: fresh`` the first
    ``steps x tokens`` tokens of the calibration text, one unseen window per step."""
    from llmopt.quant.calibration import calibration_windows

    opts, cal = scheme["tune"], scheme["calibration"]
    text_tokens = opts["steps"] * opts["tokens"] if opts["windows"] == "fresh" else cal["tokens"]
    return calibration_windows(tokenizer, cal["texts"], text_tokens, window=opts["tokens"])[:opts["steps"]]


def _tune(source_dir: Path, scheme: dict, held: dict, index: dict, tensors: dict) -> tuple[dict, dict]:
    """End-to-end tuning of the held packed tensors on calibration text; their ``rel_error`` is measured again."""
    from llmopt.quant.perplexity import load_model
    from llmopt.quant.quantizers import relative_error
    from llmopt.quant.tune import tune

    opts = scheme["tune"]
    model, tok = load_model(source_dir)
    windows = tune_windows(tok, scheme)
    packed = {n: t for n, t in held.items() if n in tensors and "bits" in tensors[n]}
    tuned, report = tune(model, packed, windows, opts["steps"], opts["lr"], opts["params"], opts["topk"],
                         opts["norms"], opts["round_lr"], desc=f"tune {scheme['name']}")
    tuned = {n: t if n in packed else t.to(held[n].dtype) for n, t in tuned.items()}  # float ones: as stored
    del model
    for name in tqdm(packed, desc="error after tuning", unit="tensor", leave=False):
        path = index[name][0]
        tensors[name]["rel_error_before_tune"] = tensors[name]["rel_error"]
        tensors[name]["rel_error"] = relative_error(io.read_tensor(path, name), tuned[name])
    return {**held, **tuned}, report


_STATS_CACHE: dict = {}  # calibration statistics of the last model, reused by the next scheme in this process


def _method_for(base: str, name: str, stats: dict) -> str:
    """An untied token embedding has no input Hessian (it is a lookup, not a matmul), so under GPTQ it gets the
    mse search. A tied embedding/head and an untied head have one, the final-norm hidden states' ``X^T X``
    (``calibration.input_hessians``), and get GPTQ as the output head; the tied table is also read as the input
    embedding, where GPTQ's output-error objective does not apply (docs/benchmarks.md measures the net effect)."""
    if base == "gptq" and schemes.is_vocabulary_table(name) and name not in (stats.get("hessians") or {}):
        return "mse"
    return base


def _diag(stats: dict, key: str, name: str) -> torch.Tensor | None:
    h = (stats.get(key) or {}).get(name)
    return None if h is None else torch.diagonal(h).clone()


def _choose_mixed(index: dict, scheme: dict, plan: dict, stats: dict, model_entry: dict):
    """Measure every tensor at every option, then pick formats with the knapsack."""
    specs = schemes.options(scheme)
    total_params = sum(_numel(shape) for _, _, shape in index.values())
    budget_b, bpw = schemes.budget_bytes(scheme, model_entry, total_params)
    pinned = {n: plan[n] for n in plan if scheme.get("embedding") and schemes.is_vocabulary_table(n)}
    fixed = sum(_numel(shape) * _DTYPE_BYTES.get(dtype, 4) for name, (_, dtype, shape) in index.items() if name not in plan)
    fixed += sum(_format_bytes(s, index[n][2]) for n, s in pinned.items())
    names, costs, losses = [n for n in plan if n not in pinned], [], []
    floor = fixed + sum(min(_format_bytes(s, index[n][2]) for s in specs if s.fits(index[n][2])) for n in names)
    if budget_b < floor:  # checked before the (slow) sensitivity pass
        raise LlmoptError(f"scheme '{scheme['name']}': budget {budget_b} bytes ({bpw:.3f} bpw) is below the floor "
                          f"{floor} bytes ({8 * floor / total_params:.3f} bpw: every tensor at its smallest format)")
    kind = stats["sensitivity"]
    for name in tqdm(names, desc=f"sensitivity ({kind}, {len(specs)} formats)", unit="tensor"):
        path, _, shape = index[name]
        w = io.read_tensor(path, name)
        row_c, row_l = [], []
        for spec in specs:
            if not spec.fits(shape):
                row_c.append(budget_b + 1)  # never affordable
                row_l.append(float("inf"))
                continue
            qt = quantize(w, spec, _method_for(scheme["base"], name, stats), importance=_diag(stats, "hessians", name),
                          hessian=(stats.get("hessians") or {}).get(name), name=name, **_gptq_options(scheme, name))
            row_c.append(qt.nbytes)
            row_l.append(tensor_loss(w, qt, kind, (stats.get("fisher") or {}).get(name),
                                     _diag(stats, "hessians", name)))
        costs.append(row_c)
        losses.append(row_l)
        del w
        _release_freed_memory()
    picks = knapsack(costs, [[x if x != float("inf") else 1e300 for x in row] for row in losses], budget_b - fixed)
    chosen = {**pinned, **{n: specs[p] for n, p in zip(names, picks)}}
    used = fixed + sum(c[p] for c, p in zip(costs, picks))
    counts: dict[str, int] = {}
    for s in chosen.values():
        counts[s.label] = counts.get(s.label, 0) + 1
    return chosen, {"bytes": budget_b, "bpw": bpw, "used_bytes": used, "floor_bytes": floor,
                    "sensitivity": kind, "formats": counts, "total_loss": sum(l[p] for l, p in zip(losses, picks)),
                    "losses": {n: l[p] for n, l, p in zip(names, losses, picks)}}


def _format_bytes(spec: Spec, shape) -> int:
    """Stored bytes of a ``shape`` weight in ``spec`` (codes + fp16/bf16 scales + zeros), as format.py lays it out."""
    out, n_in = shape
    return out * n_in * spec.bits // 8 + 2 * out * (n_in // spec.group_for(n_in)) * (1 if spec.sym else 2)


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _summary(index: dict, tensors: dict, scheme: dict) -> dict:
    params = sum(_numel(shape) for _, _, shape in index.values())
    orig = sum(_numel(shape) * _DTYPE_BYTES.get(dtype, 4) for _, dtype, shape in index.values())
    stored = sum(t["bytes"] for t in tensors.values())
    q = [t for t in tensors.values() if "bits" in t]
    q_params = sum(_numel(t["shape"]) for t in q)
    return {"params": params, "quantized_params": q_params, "bytes": stored, "orig_bytes": orig,
            "bits_per_weight": 8 * stored / params, "compression": orig / stored,
            "quantized_bits_per_weight": (8 * sum(t["bytes"] for t in q) / q_params) if q_params else None,
            "mean_rel_error": (sum(t["rel_error"] for t in q) / len(q)) if q else 0.0,
            "max_rel_error": max((t["rel_error"] for t in q), default=0.0)}


def _perplexity(source_dir: Path, quant_dir: Path, scheme: dict, real: bool) -> dict:
    if scheme["perplexity"] is False:
        return {"skipped": "disabled by the scheme (perplexity: false)"}
    if not real:
        return {"skipped": "synthetic weights: perplexity is meaningless"}
    from llmopt.quant.perplexity import apply_weights, evaluate, load_model

    p = scheme["perplexity"]
    protocol = {"texts": p["texts"], "tokens": p["tokens"], "window": p["window"], "bos_per_window": True}
    model, tok = load_model(source_dir)
    float_ppl = _cached_float_ppl(source_dir, protocol, lambda: evaluate(model, tok, tuple(p["texts"]), p["tokens"], p["window"], "float"))
    if scheme["method"] == "none" and "dtype" not in scheme:  # an unchanged copy
        quant_ppl = dict(float_ppl)
    else:
        apply_weights(model, io.load_folder(quant_dir))
        quant_ppl = evaluate(model, tok, tuple(p["texts"]), p["tokens"], p["window"], scheme["name"])
    return {"float": float_ppl, "quant": quant_ppl, "protocol": protocol,
            "increase_pct": {k: 100 * (quant_ppl[k] / float_ppl[k] - 1) for k in float_ppl}}


def _cached_float_ppl(source_dir: Path, protocol: dict, compute) -> dict:
    """Float perplexity of a source folder is computed once per protocol and cached beside nothing it owns."""
    import hashlib
    import os

    files = sorted(io.weight_files(source_dir))
    key = hashlib.sha256(json.dumps([protocol] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files],
                                    sort_keys=True).encode() + str(source_dir.resolve()).encode()).hexdigest()[:24]
    cache = Path(os.environ.get("LLMOPT_CACHE") or Path.home() / ".cache" / "llmopt") / "ppl" / f"{key}.json"
    if cache.exists():
        return read_json(cache)
    result = compute()
    write_json(cache, result)
    return result


def _manifest(source_dir: Path, folder: Path, files: list[str], scheme: dict) -> dict:
    src = read_json(source_dir / "manifest.json") if (source_dir / "manifest.json").exists() else {}
    return {"model": src.get("model", source_dir.name), "source": src.get("source", "unknown"),
            "scale": src.get("scale", "unknown"),
            "provenance": {"quantized_from": str(source_dir), "scheme": scheme["name"], "source_provenance": src.get("provenance")},
            "files": {f: sha256_file(folder / f) for f in sorted(p.name for p in folder.iterdir() if p.is_file())}}
