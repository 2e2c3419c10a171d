"""Roofline: predicted prefill/decode tokens/s per model and target from ceilings and op counts.

A ``Device`` holds its physical ceilings (memory bandwidth, FLOP/s) and the fraction of them our kernels reach
(``bw_eff``, ``flops_eff``) plus a fixed cost per dispatched op. Every op of ``llmopt.analysis`` then takes
``max(bytes / (bw * bw_eff), flops / (flops * flops_eff)) + op_overhead``; with efficiencies 1 and no overhead
the same sum is the physical ceiling. A ``Link`` prices moving activations between two devices.

Ceilings are either *stated* (datasheets, ../shared/reference/FACTS.md §3, peers §4: each number names its
source) or *measured* by ``calibrate()`` (also ``bench/calibrate.py``) on the targets present here, through the
same ``Backend`` interface the engine uses. Profiles group devices: ``phoenix-ddr5`` / ``phoenix-lpddr5x`` (the
seed's laptop: Zen 4 CPU, Radeon 780M, XDNA1 NPU sharing DRAM), ``h100``, ``h200`` and ``here`` (measured).

    python bench/calibrate.py --targets cpu vulkan --out results/calibration.json
    llmopt analyze --all --out results/analysis     # analysis + predictions beside the seed's targets
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

from llmopt.analysis import Analysis, Op
from llmopt.errors import LlmoptError

GB = 1e9

@dataclass
class Device:
    """One device's ceilings and achieved fractions. ``memory`` is its capacity in bytes (None: host RAM)."""

    name: str  # the engine target it stands for: cpu | vulkan | npu | cuda | iree-cpu
    label: str
    bandwidth: float  # bytes/s, physical
    flops: float  # FLOP/s, physical, at the dtype the kernels compute in
    bw_eff: float = 1.0
    flops_eff: float = 1.0
    op_overhead_s: float = 0.0
    memory: float | None = None
    source: str = "stated"

    def op_time(self, flops: float, moved: float, ceiling: bool = False) -> float:
        if ceiling:
            return max(moved / self.bandwidth, flops / self.flops)
        t = max(moved / (self.bandwidth * self.bw_eff), flops / (self.flops * self.flops_eff))
        return t + self.op_overhead_s


@dataclass
class Link:
    """Cost of handing activations from one device to another: fixed latency plus bytes over bandwidth."""

    latency_s: float
    bandwidth: float
    source: str = "stated"

    def time(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth


@dataclass
class Profile:
    name: str
    label: str
    devices: dict = field(default_factory=dict)  # name -> Device
    links: dict = field(default_factory=dict)  # "a->b" (sorted pair "a|b") -> Link
    default_link: Link | None = None

    def link(self, a: str, b: str) -> Link:
        if a == b:
            return Link(0.0, math.inf)
        return self.links.get("|".join(sorted((a, b)))) or self.default_link or Link(20e-6, 10 * GB)

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "devices": {k: asdict(v) for k, v in self.devices.items()},
                "links": {k: asdict(v) for k, v in self.links.items()},
                "default_link": asdict(self.default_link) if self.default_link else None}

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        try:
            return cls(d["name"], d.get("label", d["name"]), {k: Device(**v) for k, v in d["devices"].items()},
                       {k: Link(**v) for k, v in d.get("links", {}).items()},
                       Link(**d["default_link"]) if d.get("default_link") else None)
        except (KeyError, TypeError) as err:
            raise LlmoptError(f"roofline profile: malformed ({err})") from None


def _phoenix(name: str, dram_gbs: float, dram_label: str) -> Profile:
    """The seed's laptop (Ryzen 7 7840HS / 8845HS class). Efficiencies come from peers measured on it (FACTS §4:
    llama.cpp Qwen2.5-7B Q4_K_M, 4.68 GB: Vulkan tg128 16.5 tok/s = 77 GB/s, CPU-only 11.0 tok/s = 51 GB/s, Vulkan
    pp512 321 tok/s = 4.9 TFLOP/s), so predictions are 'what llama.cpp-class kernels reach', ceilings the physics."""
    bw = dram_gbs * GB
    cpu = Device("cpu", f"Zen 4, 8 cores ({dram_label})", bw, 2.05e12, bw_eff=51.5 / 89.6, flops_eff=0.35,
                 op_overhead_s=5e-6,
                 source="stated: 8 cores x 4.0 GHz x 64 bf16 FLOP/cycle; eff. from llama.cpp CPU tg128 (FACTS §4)")
    gpu = Device("vulkan", f"Radeon 780M, 12 CU ({dram_label})", bw, 16.6e12, bw_eff=77.2 / 89.6, flops_eff=0.29,
                 op_overhead_s=8e-6, memory=16 * GB,
                 source="stated: FACTS §3 (fp16 16.6 TFLOP/s); eff. from llama.cpp Vulkan tg128/pp512 (FACTS §4)")
    npu = Device("npu", "XDNA1 NPU, 4x4 compute tiles", bw, 4.1e12, bw_eff=0.5, flops_eff=0.5, op_overhead_s=50e-6,
                 memory=2 * GB, source="stated: 16 tiles x 128 bf16 MAC x 2 x 1.0 GHz (FACTS §3); eff. assumed 0.5")
    _npu_costmodel(npu)
    shared = Link(20e-6, bw / 2, source="shared DRAM: a copy reads and writes; 20 us sync assumed")
    npu_link = Link(60e-6, bw / 2, source="XRT buffer sync + kernel launch, assumed 60 us")
    return Profile(name, f"Phoenix laptop, {dram_label}", {"cpu": cpu, "vulkan": gpu, "npu": npu},
                   {"cpu|npu": npu_link, "npu|vulkan": npu_link}, shared)


def _npu_costmodel(npu: Device) -> None:
    """Take the NPU's ceilings from the NPU area's cost model (``llmopt.costmodel``) when it provides them."""
    try:
        from llmopt import costmodel
    except ImportError:
        return
    getter = getattr(costmodel, "npu_ceilings", None)
    if getter is None:
        return
    c = getter()
    for key in ("bandwidth", "flops", "bw_eff", "flops_eff", "op_overhead_s"):
        if key in c:
            setattr(npu, key, float(c[key]))
    npu.source = "llmopt.costmodel.npu_ceilings()"


def _nvidia(name: str, label: str, bw: float, flops: float, source: str, memory: float) -> Profile:
    gpu = Device("cuda", label, bw, flops, bw_eff=0.6, flops_eff=0.6, op_overhead_s=4e-6, memory=memory,
                 source=source + "; eff. 0.6 (gpt-fast bf16 7B: 147 tok/s = 0.59 of H100 HBM, FACTS §4)")
    vk = replace(gpu, name="vulkan", bw_eff=0.45, op_overhead_s=8e-6,
                 source=source + "; eff. from llama.cpp Vulkan/CUDA tg ratio on A100 (FACTS §4)")
    host = Device("cpu", "host CPU (16 cores)", 200 * GB, 1.5e12, bw_eff=0.5, flops_eff=0.3, op_overhead_s=5e-6,
                  source="assumed server CPU")
    return Profile(name, label, {"cuda": gpu, "vulkan": vk, "cpu": host}, {},
                   Link(10e-6, 25 * GB, "PCIe 5 x16, assumed"))


def stated_profiles() -> dict[str, Profile]:
    return {
        "phoenix-ddr5": _phoenix("phoenix-ddr5", 89.6, "DDR5-5600 89.6 GB/s"),
        "phoenix-lpddr5x": _phoenix("phoenix-lpddr5x", 120.0, "LPDDR5x-7500 120 GB/s"),
        "h100": _nvidia("h100", "NVIDIA H100 SXM", 3.35e12, 989e12,
                        "stated: FACTS §3 (HBM3 3.35 TB/s, bf16 989 TFLOP/s)", 80 * GB),
        "h200": _nvidia("h200", "NVIDIA H200", 4.8e12, 989e12,
                        "stated: 4.8 TB/s, 989 TFLOP/s (measured here: copy 4.19 TB/s, matmul 777 TFLOP/s, FACTS §3)",
                        141 * GB),
    }


# --- prediction ---------------------------------------------------------------------------------------------


def op_cost(op: Op, phase: str, n: int, batch: int = 1) -> tuple[float, float]:
    """(FLOPs, bytes) of ``op`` for ``batch`` sequences: weights are read once per step, the rest scales."""
    flops, moved = op.decode(n) if phase == "decode" else op.prefill(n)
    weights = op.weight_bytes_read(1)
    return flops * batch, weights + (moved - weights) * batch


def unit_time(an: Analysis, unit: tuple, dev: Device, phase: str, n: int, batch: int = 1,
              ceiling: bool = False) -> float:
    """Seconds for one unit (("embed", None), ("layer", i), ("head", None)) on ``dev``."""
    return sum(dev.op_time(*op_cost(op, phase, n, batch), ceiling=ceiling) for op in an.unit_ops(*unit))


def boundary_bytes(an: Analysis, phase: str, n: int, batch: int = 1) -> float:
    """Activation bytes crossing a device boundary between layers (float32 hidden state)."""
    tokens = 1 if phase == "decode" else n
    return 4.0 * an.arch.args.hidden * tokens * batch


def plan_time(an: Analysis, profile: Profile, assignment: list[str], phase: str, n: int, batch: int = 1,
              ceiling: bool = False) -> float:
    """Seconds for one step (a decode token, or a prefill of ``n``) with unit k on device ``assignment[k]``."""
    units = an.units()
    if len(assignment) != len(units):
        raise LlmoptError(f"assignment has {len(assignment)} entries, model has {len(units)} units")
    total, prev = 0.0, None
    for unit, dev in zip(units, assignment):
        if dev not in profile.devices:
            raise LlmoptError(f"profile '{profile.name}' has no device '{dev}'")
        total += unit_time(an, unit, profile.devices[dev], phase, n, batch, ceiling)
        if prev is not None and prev != dev and not ceiling:
            total += profile.link(prev, dev).time(boundary_bytes(an, phase, n, batch))
        prev = dev
    return total


def predict(an: Analysis, profile: Profile, assignment: list[str] | str, prompt: int = 512, gen: int = 128,
            batch: int = 1) -> dict:
    """Predicted and ceiling tok/s for prefill of ``prompt`` tokens and decode of ``gen`` tokens after it.

    Decode is costed at the mean context (prompt + gen/2); batch > 1 gives aggregate tok/s over the batch."""
    if isinstance(assignment, str):
        assignment = [assignment] * len(an.units())
    ctx = prompt + gen // 2
    t_pre = plan_time(an, profile, assignment, "prefill", prompt, batch)
    t_dec = plan_time(an, profile, assignment, "decode", ctx, batch)
    c_pre = plan_time(an, profile, assignment, "prefill", prompt, batch, ceiling=True)
    c_dec = plan_time(an, profile, assignment, "decode", ctx, batch, ceiling=True)
    return {"profile": profile.name, "batch": batch, "prompt": prompt, "gen": gen,
            "prefill_tok_s": batch * prompt / t_pre, "decode_tok_s": batch / t_dec, "ttft_s": t_pre + t_dec,
            "decode_ms": 1e3 * t_dec, "prefill_ms": 1e3 * t_pre,
            "ceiling_prefill_tok_s": batch * prompt / c_pre, "ceiling_decode_tok_s": batch / c_dec}


# --- calibration on the targets present here ------------------------------------------------------------------


def _median_time(fn, sync, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def host_ceilings(repeats: int = 5, mib: int = 256) -> dict:
    """Physical host ceilings measured with torch: copy bandwidth (read + write) and float32/bf16 matmul FLOP/s."""
    import torch

    n = mib * (1 << 20) // 4
    src, dst = torch.empty(n), torch.empty(n)
    src.uniform_()
    t = _median_time(lambda: dst.copy_(src), lambda: None, repeats)
    out = {"bandwidth": 2 * src.numel() * 4 / t}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(1024, 1024, dtype=dtype)
        b = torch.randn(1024, 1024, dtype=dtype)
        t = _median_time(lambda: a @ b, lambda: None, repeats)
        out[f"matmul_{str(dtype).removeprefix('torch.')}"] = 2 * 1024**3 / t
    return out


def cuda_ceilings(repeats: int = 10) -> dict:
    """Physical CUDA ceilings: device copy bandwidth and bf16 matmul FLOP/s (needs a CUDA device)."""
    import torch

    if not torch.cuda.is_available():
        raise LlmoptError("cuda: torch.cuda.is_available() is False")
    n = 1 << 30  # 2 GiB of bf16: far beyond any L2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    t = _median_time(lambda: dst.copy_(src), torch.cuda.synchronize, repeats)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    tm = _median_time(lambda: a @ a, torch.cuda.synchronize, repeats)
    return {"bandwidth": 2 * n * 2 / t, "matmul_bfloat16": 2 * 8192**3 / tm, "device": torch.cuda.get_device_name()}


def calibrate_backend(target: str, backend=None, repeats: int = 5, k: int = 4096, n: int = 4096,
                      prefill_tokens: int = 64) -> dict:
    """What the backend's own kernels reach, through the ``Backend`` interface the engine uses: a 4-bit
    group-128 GEMV (decode-like, bytes/s of packed weight), the same weight at ``prefill_tokens`` rows (FLOP/s),
    the cost of a tiny op (dispatch overhead) and host<->device transfers (latency and bandwidth)."""
    import torch

    from llmopt.quant.format import QuantizedTensor, pack_bits

    if backend is None:
        from llmopt.backends import get_backend

        backend = get_backend(target)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, k // 128, generator=gen) * 0.01 + 0.001).to(torch.float16)
    qt = QuantizedTensor(pack_bits(codes, 4), scales, None, 4, 128, (n, k))
    w = backend.linear_weight("calib.int4", qt)
    x1 = backend.from_host(torch.randn(1, 1, k, generator=gen))
    xp = backend.from_host(torch.randn(1, prefill_tokens, k, generator=gen))
    sync = backend.synchronize
    t_gemv = _median_time(lambda: backend.linear(x1, w), sync, repeats)
    t_gemm = _median_time(lambda: backend.linear(xp, w), sync, max(2, repeats // 2))
    small = backend.from_host(torch.randn(1, 1, 64, generator=gen))
    t_small = _median_time(lambda: backend.add(small, small), sync, repeats * 4)
    host_small, host_big = torch.randn(1, 1, 4096), torch.randn(1, 512, 4096)
    t_up_small = _median_time(lambda: backend.to_host(backend.from_host(host_small)), sync, repeats * 4)
    t_up_big = _median_time(lambda: backend.to_host(backend.from_host(host_big)), sync, repeats)
    big_bytes = 2 * host_big.numel() * 4  # there and back
    link_bw = max(big_bytes / max(t_up_big - t_up_small, 1e-9), 1.0)
    return {"target": target, "int4_gemv_bytes_s": qt.nbytes / t_gemv, "int4_gemv_s": t_gemv,
            "gemm_flops_s": 2.0 * n * k * prefill_tokens / t_gemm, "op_overhead_s": t_small,
            "link_latency_s": t_up_small / 2, "link_bandwidth": link_bw, "shape": [n, k], "repeats": repeats}


def calibrated_profile(calibration: dict) -> Profile:
    """The ``here`` profile from ``calibrate()`` output: physical ceilings from the host (or CUDA) micro-benchmarks,
    efficiencies and overheads from each backend's own kernels."""
    host = calibration.get("host") or {}
    devices, links = {}, {}
    for target, c in calibration.get("backends", {}).items():
        if "error" in c:
            continue
        label = calibration.get("labels", {}).get(target, target)
        # A GPU's ceilings are the CUDA micro-benchmarks' (also for Vulkan on the same card); lavapipe and the
        # CPU backends run on host memory and host cores.
        on_gpu = target == "cuda" or (target == "vulkan" and "llvmpipe" not in label.lower() and "cuda" in calibration)
        phys = calibration.get("cuda") if on_gpu else host
        if not phys or "bandwidth" not in phys:
            continue
        flops = phys.get("matmul_bfloat16") if on_gpu else max(phys.get("matmul_float32", 0.0),
                                                               phys.get("matmul_bfloat16", 0.0))
        devices[target] = Device(
            target, label, phys["bandwidth"], flops,
            bw_eff=min(1.0, c["int4_gemv_bytes_s"] / phys["bandwidth"]), flops_eff=min(1.0, c["gemm_flops_s"] / flops),
            op_overhead_s=c["op_overhead_s"], source=f"measured {calibration.get('date', '')}: bench/calibrate.py")
        if target != "cpu":
            links[f"cpu|{target}" if "cpu" < target else f"{target}|cpu"] = Link(
                c["link_latency_s"], c["link_bandwidth"], source="measured: from_host/to_host round trip")
    if not devices:
        raise LlmoptError("calibration: no backend was calibrated (every target absent or failed)")
    return Profile("here", "this machine (measured)", devices, links, Link(20e-6, 10 * GB))


def calibrate(targets: list[str], repeats: int = 5, size: int = 4096, prefill_tokens: int = 64,
              host_mib: int = 256) -> dict:
    """Run the micro-benchmarks on each present target; an absent or failing one is recorded with its reason.
    ``size`` is the square int4 weight of the GEMV/GEMM (4096: 8 MiB, beyond the caches)."""
    import datetime
    import platform

    from llmopt.backends import probe

    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.node(), "cpu": platform.processor() or platform.machine(),
              "host": host_ceilings(repeats, host_mib), "backends": {}, "labels": {},
              "sizes": {"weight": [size, size], "prefill_tokens": prefill_tokens, "host_mib": host_mib}}
    for target in targets:
        try:
            p = probe(target)
            if not p.get("present"):
                result["backends"][target] = {"error": f"absent: {p.get('reason', '')}"}
                continue
            result["labels"][target] = str(p.get("device", {}).get("name", target))
            if target == "cuda":
                result["cuda"] = cuda_ceilings(repeats)
            result["backends"][target] = calibrate_backend(target, repeats=repeats, k=size, n=size,
                                                           prefill_tokens=prefill_tokens)
        except LlmoptError as err:
            result["backends"][target] = {"error": str(err)}
        except Exception as err:  # a backend crashing is recorded, not fatal to the calibration of the others
            result["backends"][target] = {"error": f"{type(err).__name__}: {err}"}
    return result


def prediction_table(models: dict, precisions: list, profiles: dict, prompt: int = 512, gen: int = 128,
                     batches: tuple = (1,)) -> list[dict]:
    """Predicted and ceiling tok/s for every model (registry entries at full scale), precision and device of
    every profile, beside the seed's target: the table behind ``llmopt analyze``."""
    from llmopt.analysis import Arch, analyze

    rows = []
    for model_id, entry in models.items():
        arch = Arch.from_entry(entry, model_id)
        seed = entry.get("seed") or {}
        lo, hi = (seed.get("tok_s") or [None, None])[:2]
        for prec in precisions:
            an = analyze(arch, prec)
            for prof in profiles.values():
                for dev in prof.devices:
                    for batch in batches:
                        p = predict(an, prof, dev, prompt, gen, batch)
                        rows.append({"model": model_id, "precision": prec.name, "linear_bpw": prec.linear_bpw,
                                     "weight_gb": an.weight_bytes / GB, "profile": prof.name, "device": dev,
                                     "batch": batch, "decode_tok_s": p["decode_tok_s"],
                                     "prefill_tok_s": p["prefill_tok_s"],
                                     "ceiling_decode_tok_s": p["ceiling_decode_tok_s"],
                                     "ceiling_prefill_tok_s": p["ceiling_prefill_tok_s"], "seed_tok_s_low": lo,
                                     "seed_tok_s_high": hi, "fits_memory": prof.devices[dev].memory is None
                                     or an.weight_bytes <= prof.devices[dev].memory})
    return rows
