"""Partition: assign the embedding, each decoder layer and the head to devices under memory budgets.

The exact solver is an integer program (PuLP + CBC, which Snakemake already depends on): binary ``x[u, d]``
puts unit ``u`` on device ``d``; continuous ``y[u, d, e] >= x[u-1, d] + x[u, e] - 1`` pays the activation
hand-over whenever consecutive units change device; ``sum_u bytes[u] x[u, d] <= budget[d]`` for every budgeted
device (a tied embedding/head table is stored once per device that holds either). It minimises predicted
decode time per token plus a small weight (settings ``objective``, default 1e-3) times prefill time per prompt
token: decode first, prefill as the tie-break (or any other trade-off the weights state). Unit costs come from
``llmopt.roofline`` (measured ceilings for the devices here, stated ones for the Phoenix laptop).

Beside it, the seed's heuristic: NPU coverage by size class (<= 3B params 100%, <= 10B 50%, <= 20B 30%, larger
20% of the layers on the NPU, the rest on the iGPU), costed with the same model and checked against the budgets.

    llmopt partition results/qwen2.5-7b-instruct/w4g128/quant --target vulkan --out /tmp/partition.json
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

from llmopt import roofline
from llmopt.analysis import Analysis, Arch, Precision, analyze, measured_unit_bytes
from llmopt.errors import LlmoptError
from llmopt.fsutil import read_json, write_json

GB = 1e9
BATCH_SWEEP = (1, 2, 4, 8, 16, 32, 64)  # aggregate decode tok/s of the laptop plan (the seed's numbers need batches)
DEFAULT_BUDGETS = {"npu": 2 * GB, "vulkan": 16 * GB}  # the seed's 2 GB NPU and 16 GB iGPU
DEFAULT_DEVICES = {"npu": ["npu", "vulkan", "cpu"], "vulkan": ["vulkan", "cpu"], "cuda": ["cuda", "cpu"],
                   "iree-cpu": ["iree-cpu", "cpu"], "cpu": ["cpu"]}
_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_bytes(value, where: str = "budget") -> float:
    """``2GB``, ``512 MiB``, ``1.5e9`` or a number -> bytes."""
    if isinstance(value, (int, float)) and value >= 0:
        return float(value)
    text = str(value).strip().upper().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            try:
                number = float(text[: -len(unit)])
            except ValueError:
                break
            if number >= 0:
                return number * _UNITS[unit]
    raise LlmoptError(f"{where}: {value!r} is not a size (expected bytes or e.g. '2GB', '512MiB')")


def budgets_from(settings: dict) -> dict:
    raw = settings.get("budgets", DEFAULT_BUDGETS)
    if not isinstance(raw, dict):
        raise LlmoptError("settings.budgets: expected a mapping device -> size")
    return {dev: parse_bytes(v, f"settings.budgets.{dev}") for dev, v in raw.items() if v is not None}


# --- costs and memory per unit ------------------------------------------------------------------------------


def unit_bytes(an: Analysis, measured: dict | None, kv_context: int, batch: int) -> list[float]:
    """Bytes each unit keeps on its device: weights (measured from the files when given, else from the analysis)
    plus its KV cache for ``batch`` sequences of ``kv_context`` tokens."""
    out = []
    for unit, layer in an.units():
        ops = an.unit_ops(unit, layer)
        if measured is not None:
            key = layer if unit == "layer" else unit
            weights = float(measured.get(key, 0))
            if unit == "head" and measured.get("tied"):
                weights += float(measured.get("embed", 0))  # counted once when on one device, see solve()
        else:  # the analysis gives a tied head its own copy of the table; solve() shares it
            weights = sum(op.weight_bytes for op in ops)
        kv = sum(op.kv_bytes_per_token * (min(kv_context, op.window) if op.window else kv_context) for op in ops)
        out.append(weights + kv * batch)
    return out


def tied_bytes(an: Analysis, measured: dict | None) -> float:
    """Bytes of the table shared by embedding and head (0 when untied)."""
    if measured is not None:
        return float(measured.get("embed", 0)) if measured.get("tied") else 0.0
    return an.unit_ops("embed")[0].weight_bytes if an.arch.args.tie_embeddings else 0.0


def unit_costs(an: Analysis, profile: roofline.Profile, devices: list[str], prompt: int, ctx: int, batch: int):
    """Seconds per unit and device for a decode step and for the prefill."""
    dec = [{d: roofline.unit_time(an, u, profile.devices[d], "decode", ctx, batch) for d in devices}
           for u in an.units()]
    pre = [{d: roofline.unit_time(an, u, profile.devices[d], "prefill", prompt, batch) for d in devices}
           for u in an.units()]
    return dec, pre


# --- the exact solver ---------------------------------------------------------------------------------------


def solve(cost: list[dict], link: dict, mem: list[float], budgets: dict, tied: float = 0.0,
          time_limit: float = 120.0) -> list[str]:
    """Optimal assignment (one device per unit) minimising ``sum cost[u][d] + sum link[(d, e)]`` at each device
    change, under ``budgets``. ``tied`` bytes are shared by the first and last unit (tied embedding / head):
    counted once on a device holding both. Raises LlmoptError when no assignment meets the budgets."""
    import pulp

    devices = list(cost[0])
    n, k = len(cost), len(devices)
    prob = pulp.LpProblem("partition", pulp.LpMinimize)
    x = {(u, i): prob.add_variable(f"x_{u}_{i}", cat="Binary") for u in range(n) for i in range(k)}
    y = {(u, i, j): prob.add_variable(f"y_{u}_{i}_{j}", lowBound=0) for u in range(1, n)
         for i in range(k) for j in range(k) if i != j}
    prob += (pulp.lpSum(cost[u][d] * x[u, i] for u in range(n) for i, d in enumerate(devices))
             + pulp.lpSum(link[devices[i], devices[j]] * var for (u, i, j), var in y.items()))
    for u in range(n):
        prob += pulp.lpSum(x[u, i] for i in range(k)) == 1
    for (u, i, j), var in y.items():  # y = 1 exactly when unit u-1 is on device i and unit u on device j
        prob += var >= x[u - 1, i] + x[u, j] - 1
    for i, d in enumerate(devices):
        if d not in budgets:
            continue
        used = pulp.lpSum(mem[u] * x[u, i] for u in range(n))
        if tied and n > 1:  # the head's mem includes its own copy of the table; share it when both are here
            both = prob.add_variable(f"both_{i}", lowBound=0)  # = x[0, i] AND x[n-1, i]
            prob += both <= x[0, i]
            prob += both <= x[n - 1, i]
            used = used - tied * both
        prob += used <= budgets[d]
    with warnings.catch_warnings():  # PuLP 3.3 deprecates its bundled CBC; the replacement needs a system cbc
        warnings.simplefilter("ignore", DeprecationWarning)
        prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit))
    status = pulp.LpStatus[prob.status]
    if status == "Infeasible":
        raise LlmoptError(f"no partition meets the budgets {_fmt_budgets(budgets)} (total {sum(mem) / GB:.3g} GB "
                          f"to place, smallest unit {min(mem) / GB:.3g} GB, unbudgeted devices: "
                          f"{[d for d in devices if d not in budgets] or 'none'})")
    if status != "Optimal":
        raise LlmoptError(f"partition solver ended with status {status} within {time_limit:.0f} s")
    return [next(d for i, d in enumerate(devices) if (x[u, i].value() or 0) > 0.5) for u in range(n)]


def _fmt_budgets(budgets: dict) -> str:
    return "{" + ", ".join(f"{d}: {b / GB:.3g} GB" for d, b in budgets.items()) + "}"


def seed_heuristic(an: Analysis, devices: list[str]) -> tuple[list[str], str]:
    """The seed's rule: a size class fixes the share of layers on the NPU (first layers), the rest and the
    embedding/head on the iGPU (or the CPU without one). Without an NPU: everything on the first device."""
    n = an.arch.args.n_layers
    if "npu" not in devices:
        return [devices[0]] * (n + 2), f"single device ({devices[0]})"
    params = an.params
    cover = 1.0 if params <= 3e9 else 0.5 if params <= 10e9 else 0.3 if params <= 20e9 else 0.2
    rest = "vulkan" if "vulkan" in devices else "cpu"
    on_npu = round(cover * n)
    layers = ["npu"] * on_npu + [rest] * (n - on_npu)
    return [rest] + layers + [rest], f"seed size class: {cover:.0%} of layers on the NPU, rest on {rest}"


# --- plans --------------------------------------------------------------------------------------------------


def evaluate(an, profile, assignment, mem, budgets, tied, prompt, gen, batch) -> dict:
    """Predicted times of an assignment, bytes per device and whether it meets the budgets."""
    used: dict[str, float] = {}
    for dev, m in zip(assignment, mem):
        used[dev] = used.get(dev, 0.0) + m
    if tied and assignment[0] == assignment[-1]:
        used[assignment[0]] -= tied
    over = {d: used[d] for d in used if d in budgets and used[d] > budgets[d]}
    pred = roofline.predict(an, profile, assignment, prompt, gen, batch)
    return {"predicted": pred, "bytes_per_device": used, "feasible": not over,
            "violations": {d: f"{b / GB:.3f} GB > budget {budgets[d] / GB:.3g} GB" for d, b in over.items()}}


def segments(an: Analysis, assignment: list[str], mem: list[float], dec: list[dict], pre: list[dict]) -> list[dict]:
    """Runs of consecutive decoder layers on one device (the engine's plan format)."""
    out = []
    for k, dev in enumerate(assignment[1:-1]):
        u = k + 1
        if out and out[-1]["device"] == dev:
            seg = out[-1]
            seg["layers"][1] = k
        else:
            seg = {"layers": [k, k], "device": dev, "weight_bytes": 0.0,
                   "predicted_ms": {"decode": 0.0, "prefill": 0.0}}
            out.append(seg)
        seg["weight_bytes"] += mem[u]
        seg["predicted_ms"]["decode"] += 1e3 * dec[u][dev]
        seg["predicted_ms"]["prefill"] += 1e3 * pre[u][dev]
    return out


def transfers(an: Analysis, profile, assignment: list[str], prompt: int, batch: int) -> list[dict]:
    out = []
    for u in range(1, len(assignment)):
        a, b = assignment[u - 1], assignment[u]
        if a != b:
            link = profile.link(a, b)
            dec_b = roofline.boundary_bytes(an, "decode", 1, batch)
            pre_b = roofline.boundary_bytes(an, "prefill", prompt, batch)
            out.append({"after_unit": u - 1, "after_layer": u - 2, "from": a, "to": b, "bytes_decode": dec_b,
                        "ms_decode": 1e3 * link.time(dec_b), "ms_prefill": 1e3 * link.time(pre_b)})
    return out


def plan(an: Analysis, profile: roofline.Profile, devices: list[str], budgets: dict, measured: dict | None,
         settings: dict) -> dict:
    """Optimal plan and the seed heuristic for one model on ``devices`` of ``profile``."""
    prompt, gen = int(settings.get("prompt_len", 512)), int(settings.get("gen_len", 128))
    batch = int(settings.get("plan_batch", 1))
    ctx = prompt + gen // 2
    budgets = {d: b for d, b in budgets.items() if d in devices}
    mem = unit_bytes(an, measured, prompt + gen, batch)
    tied = tied_bytes(an, measured)
    dec, pre = unit_costs(an, profile, devices, prompt, ctx, batch)
    weights = {"decode": 1.0, "prefill": 1e-3, **(settings.get("objective") or {})}
    w_dec, w_pre = float(weights["decode"]), float(weights["prefill"]) / prompt  # prefill per prompt token
    cost = [{d: w_dec * dec[u][d] + w_pre * pre[u][d] for d in devices} for u in range(len(dec))]
    link = {(a, b): w_dec * profile.link(a, b).time(roofline.boundary_bytes(an, "decode", ctx, batch))
            + w_pre * profile.link(a, b).time(roofline.boundary_bytes(an, "prefill", prompt, batch))
            for a in devices for b in devices if a != b}
    heur, rule = seed_heuristic(an, devices)
    result = {"devices": devices, "budgets": budgets, "profile": profile.name, "prompt": prompt, "gen": gen,
              "batch": batch, "objective": weights,
              "solver": "ilp (PuLP/CBC): min decode s/token + prefill weight x prefill s/prompt token"}
    h = evaluate(an, profile, heur, mem, budgets, tied, prompt, gen, batch)
    result["heuristic"] = {"rule": rule, **h, "segments": segments(an, heur, mem, dec, pre),
                           "embedding": heur[0], "head": heur[-1]}
    try:
        best = solve(cost, link, mem, budgets, tied)
    except LlmoptError as err:
        result.update({"error": str(err), "infeasible": True})
        return result
    ev = evaluate(an, profile, best, mem, budgets, tied, prompt, gen, batch)
    result.update({"assignment": best, "segments": segments(an, best, mem, dec, pre), "embedding": best[0],
                   "head": best[-1], "transfers": transfers(an, profile, best, prompt, batch), **ev})
    hd, bd = h["predicted"]["decode_tok_s"], ev["predicted"]["decode_tok_s"]
    result["speedup_vs_heuristic"] = {"decode": bd / hd, "prefill": ev["predicted"]["prefill_tok_s"]
                                      / h["predicted"]["prefill_tok_s"]}
    return result


def load_profile(settings: dict, devices: list[str]) -> roofline.Profile:
    """The measured ``here`` profile (settings['calibration'] file), or a quick in-process calibration."""
    path = settings.get("calibration")
    if path and Path(path).is_file():
        calib = read_json(path)
    else:
        calib = roofline.calibrate([d for d in devices], repeats=3)
    profile = roofline.calibrated_profile(calib)
    missing = [d for d in devices if d not in profile.devices]
    if missing:
        errors = {d: calib.get("backends", {}).get(d, {}).get("error", "not calibrated") for d in missing}
        raise LlmoptError(f"calibration lacks {missing}: {errors}")
    return profile


def laptop_plan(arch: Arch, precision: Precision, settings: dict, budgets: dict, seed: dict | None = None) -> dict:
    """The seed's question at full scale: the Phoenix laptop (NPU + 780M + CPU), both DRAM options."""
    an = analyze(arch, precision)
    out = {"precision": precision.__dict__, "params": an.params, "weight_bytes": an.weight_bytes,
           "seed": seed}
    for name in ("phoenix-ddr5", "phoenix-lpddr5x"):
        profile = roofline.stated_profiles()[name]
        out[name] = plan(an, profile, ["npu", "vulkan", "cpu"], budgets, None, settings)
        best = out[name].get("assignment")
        if best:
            out[name]["batch_sweep"] = {b: roofline.predict(an, profile, best, out[name]["prompt"], out[name]["gen"], b)
                                        ["decode_tok_s"] for b in BATCH_SWEEP}
    return out


def laptop_record(quant_dir: Path, model_entry: dict, settings: dict) -> dict:
    """The full-scale Phoenix laptop plans of a model at the bits per weight of its quantized folder (it depends on
    the model and scheme, not on the target: the workflow computes it once, ``write_laptop_plan``)."""
    quant_dir = Path(quant_dir)
    model_id = model_entry.get("id") or quant_dir.parent.parent.name
    scheme = quant_dir.parent.name
    arch = Arch.from_folder(quant_dir)
    linear_bpw, embed_bpw = measured_bpw(arch, measured_unit_bytes(quant_dir))
    # At this scheme's bits per weight: quant.json's figure for the quantized tensors when present (exact for the
    # scheme at any scale); the file sizes otherwise (they include the norms, which weigh more in a tiny model).
    qjson = read_json(quant_dir / "quant.json") if (quant_dir / "quant.json").is_file() else {}
    full_bpw = qjson.get("quantized_bits_per_weight") or linear_bpw
    try:
        full_arch = Arch.from_entry(model_entry, model_id)
        full = Precision(full_bpw, min(embed_bpw, 16.0), 2.0, 2.0, name=scheme)  # float tables ship as bf16
        return laptop_plan(full_arch, full, settings, budgets_from(settings), model_entry.get("seed"))
    except LlmoptError as err:
        return {"error": str(err)}


def write_laptop_plan(quant_dir: Path, model_entry: dict, settings: dict, out: Path) -> dict:
    """Write ``laptop.json``: the record ``laptop_record`` computes, which every target's partition.json embeds."""
    record = laptop_record(quant_dir, model_entry, settings)
    write_json(out, record)
    return record


def write_plan(quant_dir: Path, model_entry: dict, target: str, probes: dict, settings: dict, out: Path) -> dict:
    """Write ``partition.json`` (+ ``partition.png``) for ``target``: the optimal plan over the present devices,
    the seed heuristic, and the full-scale Phoenix laptop plan (read from ``settings["laptop"]``, a file of
    ``write_laptop_plan``, when given). An absent target or infeasible budget is recorded (``skipped`` /
    ``error``) rather than raised, so the report can show it."""
    quant_dir, out = Path(quant_dir), Path(out)
    model_id = model_entry.get("id") or quant_dir.parent.parent.name
    scheme = quant_dir.parent.name
    budgets = budgets_from(settings)
    arch = Arch.from_folder(quant_dir)
    measured = measured_unit_bytes(quant_dir)
    linear_bpw, embed_bpw = measured_bpw(arch, measured)
    kv_bytes = float(settings.get("kv_bytes", 4))
    here_precision = Precision(linear_bpw, embed_bpw, 4.0, kv_bytes, name=scheme)
    record = {"model": model_id, "scheme": scheme, "target": target, "budgets": budgets,
              "scale": (read_json(quant_dir / "manifest.json").get("scale") if (quant_dir / "manifest.json").is_file()
                        else None)}
    record["laptop"] = (read_json(settings["laptop"]) if settings.get("laptop")
                        else laptop_record(quant_dir, model_entry, settings))
    devices_wanted = (settings.get("partition_devices") or DEFAULT_DEVICES).get(target, [target, "cpu"])
    absent = {d: probes.get(d, {}).get("reason", "no probe") for d in devices_wanted
              if not probes.get(d, {}).get("present")}
    if target in absent:
        record.update({"skipped": True, "reason": f"target {target} absent: {absent[target]}"})
    else:
        devices = [d for d in devices_wanted if d not in absent]
        record["absent_devices"] = absent
        try:
            profile = load_profile(settings, devices)
            an = analyze(arch, here_precision)
            result = plan(an, profile, devices, budgets, measured, settings)
            result["single_target"] = roofline.predict(an, profile, target, result["prompt"], result["gen"])
            record.update(result)
        except LlmoptError as err:
            record.update({"error": str(err)})
    write_json(out, record)
    draw_plan(record, out.with_name("partition.png"))
    return record


def measured_bpw(arch: Arch, measured: dict) -> tuple[float, float]:
    """Bits per weight of the decoder layers and of the embedding, from the file sizes."""
    an = analyze(arch)
    layer_params = sum(op.params for op in an.ops if op.unit == "layer")
    layer_bytes = sum(v for k, v in measured.items() if isinstance(k, int))
    embed_params = an.unit_ops("embed")[0].params
    return 8.0 * layer_bytes / max(layer_params, 1), 8.0 * measured.get("embed", 0) / max(embed_params, 1)


COLORS = {"cpu": "#4c72b0", "vulkan": "#dd8452", "npu": "#55a868", "cuda": "#c44e52", "iree-cpu": "#8172b3"}


def draw_plan(record: dict, path: Path) -> None:
    """Plans as bars of units coloured by device: the plans here (top) and the full-scale laptop plans (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from llmopt.fsutil import atomic_path

    here = [(label, p) for label, p in [("optimal", record), ("heuristic", record.get("heuristic") or {})]
            if p.get("segments")]
    laptop = []
    for prof in ("phoenix-ddr5", "phoenix-lpddr5x"):
        lp = (record.get("laptop") or {}).get(prof) or {}
        pair = [("optimal", lp), ("seed heuristic", lp.get("heuristic") or {})]
        laptop += [(f"{prof}: {label}", p) for label, p in pair if p.get("segments")]
    groups = [(f"here ({record.get('scale') or 'as built'}): {record.get('target')}", here),
              ("Phoenix laptop, full scale", laptop)]
    groups = [g for g in groups if g[1]]
    title = f"{record.get('model')} / {record.get('scheme')} / {record.get('target')}"
    if record.get("skipped") or record.get("error"):
        title += ": " + ("target absent here" if record.get("skipped") else "no plan here (see error)")
    heights = [max(len(rows), 1) for _, rows in groups] or [1]
    fig, axes = plt.subplots(len(heights), 1, figsize=(9, 1.2 + 0.45 * sum(heights) + 0.5 * len(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    used = set()
    for ax, (gtitle, rows) in zip(axes[:, 0], groups or [("nothing to draw", [])]):
        for y, (label, p) in enumerate(rows):
            n_layers = p["segments"][-1]["layers"][1] + 1
            spans = [(-1, 1, p["embedding"])] + [(s["layers"][0], s["layers"][1] - s["layers"][0] + 1, s["device"])
                                                  for s in p["segments"]] + [(n_layers, 1, p["head"])]
            for left, width, dev in spans:
                ax.barh(y, width, left=left, color=COLORS.get(dev, "grey"), edgecolor="white")
                used.add(dev)
            pred = p.get("predicted") or {}
            note = f"{pred.get('decode_tok_s', math.nan):.1f} tok/s"
            note += "" if p.get("feasible", True) else ", over budget"
            ax.text(n_layers + 1.5, y, note, va="center", fontsize=8)
        ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
        ax.set_title(gtitle, fontsize=9, loc="left")
        ax.set_xlabel("embedding | decoder layers | head", fontsize=8)
        ax.margins(x=0.2)
        if not rows:
            ax.text(0.5, 0.5, "no plan", ha="center", transform=ax.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.legend(handles=[Patch(color=COLORS.get(d, "grey"), label=d) for d in sorted(used)], loc="upper right",
               fontsize=8, ncol=max(len(used), 1))
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
