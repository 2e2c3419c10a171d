"""Vulkan decode speed against the card's own copy bandwidth: copy ceiling, int4 mat-vec sweep, whole-model decode.

    python bench/vulkan_decode.py --out results.json                       # full-scale synthetic models (a GPU)
    python bench/vulkan_decode.py --kernel-dir results/kernels/vulkan ...  # SPIR-V compiled elsewhere (no glslc)
    python bench/vulkan_decode.py --layers 2 --vocab 4096 --steps 4        # the same code path, small (lavapipe)
    python bench/vulkan_decode.py --no-sweep --hidden 896 --intermediate 1024 --vocab 4096   # dispatch-bound widths
    python bench/vulkan_decode.py --real DIR --steps 16                    # a real model: vulkan eager/replayed, cpu

1. Copy bandwidth: vkCmdCopyBuffer and our copy shader (shaders/copy.comp) over a large device-local buffer,
   timed by timestamp queries, counting bytes read plus written (the usual "copy bandwidth"); the larger of
   the two is the ceiling the rest is compared with.
2. int4 mat-vec (group 128, fp16 scales) on the decode shapes of Qwen2.5-7B (and its fused q+k+v, gate+up), each
   workgroup-size/rows/set-size/K-parts specialization of the float and the int-dot shader, the latter quantizing
   float x itself or reading the x8 rows a norm wrote (SWEEP, side by side; errors against float64 references of plain x
   and, for int-dot, of x quantized as the shader does): weight bytes read per second, against the copy bandwidth. Four weight copies rotate so the
   L2 cache cannot serve repeats; configurations are taken round-robin and the fastest round kept (clocks drift).
3. Decode at batch 1 through the engine (``llmopt.engine.Model`` on ``VulkanBackend``) for full-scale
   synthetic Qwen2.5-7B and Gemma 2 9B with random int4 weights made here (nothing large is shipped), greedy,
   side by side on the same loaded model and state: wall-clock tok/s of the eager ``decode_step`` (Python
   records every dispatch, logits read back) and of the replayed step (``llmopt.backends.vulkan.replay``: the
   step recorded once, per token only a few words written, one submit, the argmax on the device, 4 bytes
   back), and of greedy decoding with two replayed steps in flight over ``--flight-steps`` tokens
   (``VulkanDecoder.greedy_steps``, as ``generate`` decodes: step t+1 queued before the host waits for step t's
   ids; 128 by default, llama-bench's tg128 count), next to the GPU time of a
   step: the sum of the eager step's kernel timestamps, and the replayed step
   resubmitted back to back (no host in between). Against the ceiling copy_bandwidth / bytes_read_per_token
   (weights + the KV cache read at the flight's middle context). Several specializations (VARIANTS) are timed on
   the same loaded model (the first is the previous default: float mat-vec, separate q/k/v and gate/up; then fused
   linears, then the int-dot mat-vec); the best (by the two-in-flight rate) is reported, all are kept in the JSON.
   Each variant's replayed step is also profiled (a timestamp after every dispatch), its mat-vecs split by weight
   (q+k+v, o, gate+up, down, head: ``matvec_by_weight``). Variants with ``attn_clock`` ("attn clock") also print
   the fused attention's phase table from its shader clocks (``attention_phases``;
   ``llmopt.backends.vulkan.phase_clock``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llmopt.backends.vulkan import VulkanBackend
from llmopt.backends.vulkan.backend import int8_chunks
from llmopt.errors import LlmoptError
from llmopt.fsutil import write_text
from llmopt.quant.format import QuantizedTensor

MODELS = {
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                   "tie_word_embeddings": False, "hidden_act": "silu"},
    "gemma-2-9b": {"model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000,
                   "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                   "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                   "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
                   "max_position_embeddings": 8192},
}
# mat-vec specializations (wg, rows a set, invocations a set, int-dot, x8 rows), side by side: the int-dot path
# quantizing float x in every workgroup or reading x8 rows a norm wrote (40 bytes a 32-value chunk instead of 128).
# --sweep-configs picks some by index.
SWEEP = [(128, 16, 0, 1, 0), (64, 4, 0, 1, 1), (128, 4, 0, 1, 1), (256, 4, 0, 1, 1), (128, 16, 0, 1, 1),
         (64, 8, 0, 1, 1), (32, 4, 0, 1, 1)]
# end-to-end variants: VulkanBackend attributes set over this device's defaults (compile.device_config), each timed
# on the same loaded model, in this order. "before" is the configuration of the start of the 2026-11-26 sessions
# (float mat-vec, separate q/k/v and gate/up, rows 8); the others each switch one measured choice back (their
# tuning variants, e.g. attention chunk sizes or K-split mat-vecs, are in docs/benchmarks.md and bench/results/);
# a change under test adds a variant naming only what it changes.
VARIANTS = [
    {"name": "default"},
    {"name": "before", "rows_per_wg": 8, "matvec_min_groups": 1024, "matvec_int_dot": False, "fuse_linears": False,
     "matvec_wg_max": 128, "matvec_x_q8": False, "fuse_rope_attention": False, "fuse_post_norm": False,
     "norm_regs_max": 0},
    {"name": "unfused attention", "fuse_rope_attention": False},  # rope(q), rope(k), kv_store, attention
    {"name": "no x8 rows", "matvec_x_q8": False},  # every int-dot mat-vec workgroup quantizes float x itself
    {"name": "previous mat-vec", "matvec_x_q8": False, "wg": 128, "rows_per_wg": 16, "fuse_gated_act": False},
    # the activation and down's x8 rows in the gate/up mat-vec (default on a GPU): gated_act instead, or the gated
    # mat-vec in its layout before v14 (2 outputs a workgroup: float output, so down quantizes it); the layouts
    # tried beside the default are in docs/benchmarks.md (v14)
    {"name": "separate gated_act", "fuse_gated_act": False},
    {"name": "gated no x8", "fuse_gated_act": True, "gated_layout": (64, 0, 4)},
    # the residual add and the next norm folded into the o and down mat-vecs (default on a GPU; Qwen's plain norms
    # only): linear + add_rmsnorm instead; the layouts tried beside the default are in docs/benchmarks.md (v16)
    {"name": "no producer norm", "fuse_producer_norm": False},
    {"name": "separate post norm", "fuse_post_norm": False},  # Gemma: rmsnorm, then add_rmsnorm
    # Gemma's sandwich norm folded into the o and down mat-vecs, each row's last workgroup finishing it (default on a
    # GPU, v21; "auto" then chains Gemma too): linear + norm_add_rmsnorm instead, on barriers (the default before v21)
    {"name": "no sandwich fold", "fuse_sandwich_norm": False},
    # chained, the sandwich fold's grid form (v22: every workgroup finishes its own outputs after a grid wait, where
    # its workgroups are at most the SMs): the last workgroup's tail instead (v21)
    {"name": "sandwich tail", "sandwich_grid_max": 0},
    # Gemma's sandwich fold in v16-v22's layout (1024, 128, 4: 8 sets of 4 rows) instead of its own (512, 128, 8: 4 sets
    # of 8 rows, v23); the other layouts swept, and the plain fold's (Qwen's) in (512, 128, 8), are in docs (v23)
    {"name": "sandwich 1024/128/4", "sandwich_layout": (1024, 128, 4)},
    {"name": "norms over memory", "norm_regs_max": 0},  # add_rmsnorm's passes over memory instead of registers
    {"name": "attn no prefetch", "attn_prefetch": False},  # rope_attention without its first loads issued ahead
    {"name": "attn no x8", "attn_x8": False},  # rope_attention writes float only: o's workgroups each quantize x
    {"name": "attn clock", "attn_clock": True},  # rope_attention's phases stamped: the phase table (attention_phases)
    # the replayed step's dispatches chained through a counter instead of barriers (chain.py, v18; "auto" on a GPU:
    # every model but those with Gemma's sandwich norms): forced on, or off; "no barriers" is the bound of what
    # chaining can win: the step recorded without barriers, wrong results (timing only, not checked)
    {"name": "chain", "decode_chain": "chain"},
    {"name": "no chain", "decode_chain": "off"},
    {"name": "no barriers (timing only)", "decode_chain": "no barriers"},
    # chained, the decode attention loads its first keys and values before its wait (v20), and at short contexts more
    # of its chunk's cached values into shared memory ("stage"); "attn no stage": the registers' loads only
    {"name": "attn no stage", "attn_stage_slots": 0},
    # the first block's norm its own rmsnorm dispatch after the embedding, not folded into it (v25)
    {"name": "no embedding fold", "fuse_embedding_norm": False},
    # the argmax in 66 or 264 workgroups a row, half and twice the H100's and H200's 132 SMs (v24: one an SM)
    {"name": "argmax half", "argmax_groups": 66},
    {"name": "argmax double", "argmax_groups": 264},
    # the decode attention's splits of at least 32 slots (the default before v26: 16)
    {"name": "attn chunk 32", "attn_chunk_min": 32},
    {"name": "default again"},  # the first variant repeated last: the run's drift (KV length, clocks)
]
VARIANT_KEYS = ("wg", "rows_per_wg", "wg_reduce", "matvec_min_groups", "matvec_split", "matvec_int_dot", "fuse_linears",
                "matvec_wg_max", "fuse_rope_attention", "attn_chunk_min", "attn_split_target", "attn_wg",
                "matvec_x_q8", "fuse_gated_act", "fuse_post_norm", "norm_regs_max", "attn_prefetch",
                "attn_x8", "attn_clock", "gated_layout", "fuse_producer_norm", "norm_layout", "decode_chain",
                "attn_stage_slots", "fuse_sandwich_norm", "sandwich_grid_max", "sandwich_layout", "argmax_groups",
                "fuse_embedding_norm")


def random_int4(shape, rng, group: int = 128) -> QuantizedTensor:
    out, n_in = shape
    qweight = torch.from_numpy(np.frombuffer(rng.bytes(out * n_in // 2), dtype=np.uint8).reshape(out, n_in // 2).copy())
    scales = torch.from_numpy((rng.random((out, n_in // group), dtype=np.float32) * 0.004 + 0.002).astype(np.float16))
    return QuantizedTensor(qweight, scales, None, 4, group, (out, n_in))


def gpu_ms(be: VulkanBackend) -> float:
    return sum(v for v, _ in be.kernel_times().values())


def reset_times(be: VulkanBackend) -> None:
    be.dev.kernel_times.clear()
    be.dev.kernel_counts.clear()


def copy_bandwidth(be: VulkanBackend, nbytes: int, reps: int = 20) -> dict:
    """GB/s (read + written) of a device-local buffer copy: vkCmdCopyBuffer and our copy shader."""
    src, dst = be.dev.buffer(nbytes, name="copy src"), be.dev.buffer(nbytes, name="copy dst")
    be.dev.upload(src, np.frombuffer(np.random.default_rng(0).bytes(min(nbytes, 1 << 26)), np.uint8))
    t_end = time.perf_counter() + 2.0  # sustained work first: an idle GPU runs at low clocks
    while time.perf_counter() < t_end:
        for _ in range(20):
            be.copy(src, dst, nbytes)
        be.dev.flush()
    result = {}
    for label, run in (("copy", lambda: be.dev.copy(src, dst, nbytes)), ("copy_shader", lambda: be.copy(src, dst, nbytes))):
        run()
        be.dev.flush()
        reset_times(be)
        for _ in range(reps):
            run()
        be.dev.flush()
        ms = sum(be.dev.kernel_times.values()) / reps
        result[label] = 2 * nbytes / (ms * 1e-3) / 1e9
    be.dev.free(src)
    be.dev.free(dst)
    return result


def matvec_sweep(be: VulkanBackend, shapes: dict, rng, configs, reps: int = 50, rounds: int = 3) -> list[dict]:
    """Per shape and configuration: the fastest of ``rounds`` timings, the configurations taken round-robin.

    One pass in order is not enough on an H200: a baseline repeated at the end of a pass ran up to 2.4x faster
    than at its start (clocks settling), which ranks configurations by their place in the list.
    """
    rows = []
    saved = (be.matvec_int_dot, be.matvec_x_q8, be.matvec_wg_max, be.wg, be.rows_per_wg, be.matvec_split,
             be.matvec_min_groups)
    for label, shape in shapes.items():
        copies = [random_int4(shape, rng) for _ in range(4)]
        weights = [be.linear_weight(label, w) for w in copies]
        wbytes = copies[0].nbytes
        be.matvec_int_dot = be.matvec_x_q8 = True  # x from a norm, with x8 rows (used by the configs that say so)
        x8 = be.rmsnorm(be.from_host(torch.randn(1, 1, shape[1])), be.param("norm", torch.ones(shape[1])), 1e-6, False)
        xh = be.to_host(x8)
        x = be.from_host(xh)  # the same values, float only
        w64 = copies[0].dequantize(torch.float64)
        ref, ref_x8 = (xr @ w64.T for xr in (xh[0].double(), int8_chunks(xh[0])))
        be.matvec_min_groups = 1  # measure each configuration as given
        t_end = time.perf_counter() + 1.0  # the GPU idled while the weights were made: its clocks first (H200: the
        while time.perf_counter() < t_end:  # first shape's rounds spread 2-4x without this, 2026-11-26)
            for w in weights:
                be.linear(x8, w)
            be.synchronize()
        times, errs = {cfg: [] for cfg in configs}, {}
        for _ in range(rounds):
            for cfg in configs:
                be.wg, be.rows_per_wg, be.matvec_split, be.matvec_int_dot, with_x8 = cfg
                be.matvec_wg_max = be.wg
                xin = x8 if with_x8 else x
                if cfg not in errs:  # int-dot: against x quantized as the shader does, and against plain x
                    out = be.to_host(be.linear(xin, weights[0]))[0].double()
                    errs[cfg] = [float((out - r).norm() / r.norm()) for r in ((ref_x8 if cfg[3] else ref), ref)]
                for _ in range(reps):  # warm-up: pipeline creation, then enough back-to-back work to raise clocks
                    for w in weights:
                        be.linear(xin, w)
                be.synchronize()
                reset_times(be)
                for _ in range(reps):
                    for w in weights:
                        be.linear(xin, w)
                be.synchronize()
                kernel = "matvec_quant_idot" if cfg[3] else "matvec_quant"
                labels = [k for k in be.dev.kernel_times if k.split(" ")[0] == kernel]  # "lm_head": "<kernel> head"
                ms = sum(be.dev.kernel_times[k] for k in labels)
                times[cfg].append(ms / sum(be.dev.kernel_counts[k] for k in labels))
        for cfg, ms_all in times.items():
            (wg, rpw, split, idot, with_x8), ms, (err, err_plain) = cfg, min(ms_all), errs[cfg]
            rows.append({"shape": label, "n": shape[0], "k": shape[1], "wg": wg, "rows": rpw, "split": split,
                         "int_dot": idot, "x8": with_x8, "ms": ms, "ms_rounds": ms_all,
                         "gbps": wbytes / (ms * 1e-3) / 1e9, "rel_err": err, "rel_err_vs_plain_x": err_plain})
            kind = ("int-dot x8" if with_x8 else "int-dot   ") if idot else "float     "
            print(f"  matvec {label:10s} wg={wg:3d} rows={rpw:2d} split={split:3d} {kind}: "
                  f"{ms * 1e3:7.1f} us (worst round {max(ms_all) * 1e3:7.1f})  {rows[-1]['gbps']:7.1f} GB/s  "
                  f"err {err:.1e} (vs plain x {err_plain:.1e})")
        del weights
    be.matvec_int_dot, be.matvec_x_q8, be.matvec_wg_max = saved[:3]
    be.wg, be.rows_per_wg, be.matvec_split, be.matvec_min_groups = saved[3:]
    return rows


def replay_profile(be: VulkanBackend, model, state, token, n: int) -> dict:
    """Per kernel name, ms and dispatches a replayed step: the step recorded with a timestamp after every dispatch
    (``VulkanDecoder(profile=True)``), run once on a copy of ``state`` (``state`` itself does not advance; the
    cache slot it writes is rewritten by the next real step before anything reads it), then replayed ``n`` times
    after as many for warm-up, each replay waited for and its timestamps read."""
    from llmopt.backends.vulkan.replay import VulkanDecoder

    decoder = VulkanDecoder(model, state, profile=True)
    try:
        decoder.step(dataclasses.replace(state, valid=state.valid.clone(), next_pos=state.next_pos.clone()), token,
                     greedy=True)
        decoder.replay(n)
        for rec in (decoder.loads[0], decoder.body, decoder.greedy_tails[0]):  # drop the first step's and warm-up's
            rec.times.clear()
            rec.counts.clear()
        decoder.replay(n)
        rows = {name: {"ms": ms / n, "dispatches": count // n} for name, (ms, count) in decoder.kernel_times().items()}
    finally:
        decoder.close()
    total = sum(r["ms"] for r in rows.values())
    matvec = {name.split(" ", 1)[1]: r for name, r in rows.items() if name.startswith("matvec") and " " in name}
    print(f"      replayed step, {n} profiled replays: {total:.3f} ms of timestamps a step; " + ", ".join(
        f"{name} {r['ms'] * 1e3:.0f} us/{r['dispatches']}" for name, r in rows.items()))
    print(f"      mat-vecs by weight: {sum(r['ms'] for r in matvec.values()) * 1e3:.0f} us; " + ", ".join(
        f"{role} {r['ms'] * 1e3:.0f} us/{r['dispatches']} ({r['ms'] * 1e3 / r['dispatches']:.1f} each)"
        for role, r in sorted(matvec.items(), key=lambda kv: -kv[1]["ms"])))
    return {"steps": n, "total_ms": total, "kernels": rows, "matvec_by_weight": matvec}


def attention_phases(be: VulkanBackend, model, state, token, n: int) -> dict:
    """The fused attention's phase table (variants with ``attn_clock``; ``llmopt.backends.vulkan.phase_clock``):
    the replayed step run once on a copy of ``state``, replayed ``n`` times for warm-up, then ``n`` times each read
    back; first plain (the phases as in real use), then profiled (a timestamp after every dispatch, ~1 us each:
    where the realtime clock shares their time base, the gap from the previous dispatch's end to the first
    instruction)."""
    from llmopt.backends.vulkan.phase_clock import (dispatch_bounds, format_summary, phase_summary,
                                                    recording_stamps_ns)
    from llmopt.backends.vulkan.replay import VulkanDecoder

    out = {}
    for label, profile in (("plain", False), ("profiled", True)):
        decoder = VulkanDecoder(model, state, profile=profile)
        try:
            decoder.step(dataclasses.replace(state, valid=state.valid.clone(), next_pos=state.next_pos.clone()),
                         token, greedy=True)
            decoder.replay(n)
            samples = []
            for _ in range(n):
                decoder.replay(1)
                bounds = dispatch_bounds(recording_stamps_ns(be.dev, decoder.body), decoder.body.labels) \
                    if profile else None
                samples.append((be.attention_clock(), dict(enumerate(bounds)) if bounds else None))
        finally:
            decoder.close()
        out[label] = phase_summary(samples)
        print(f"      rope_attention phases, replayed step, {label} ({n} replays):\n" + format_summary(out[label]))
    return out


def clone(state):
    """A copy of a decode state that advances on its own (its KV cache shared)."""
    return dataclasses.replace(state, valid=state.valid.clone(), next_pos=state.next_pos.clone())


def time_variant(be: VulkanBackend, model, state, replay_state, token, steps: int,
                 flight_steps: int) -> tuple[dict, torch.Tensor]:
    """One variant (set on ``be``): ``steps`` eager and replayed steps alternating from ``token``, the replayed step
    back to back, ``flight_steps`` greedy steps with two in flight, each checked against the eager path, then the
    replay profile; the numbers and the last token."""
    decoder = be.replay_decoder(model, replay_state)  # recorded with this variant's pipelines
    walls, gpus, replayed, same = [], [], [], []
    for _ in range(steps + 2):
        reset_times(be)
        t = time.perf_counter()
        eager_token = model.decode_step(state, token).argmax(-1)  # what decode_step does without a recording
        walls.append(time.perf_counter() - t)
        gpus.append(gpu_ms(be))
        t = time.perf_counter()
        replayed_token = decoder.step(replay_state, token, greedy=True)
        replayed.append(time.perf_counter() - t)
        same.append(bool(torch.equal(eager_token, replayed_token)))
        token = eager_token
    walls, gpus, replayed = walls[2:], gpus[2:], replayed[2:]  # the first steps create pipelines
    fed = token  # check on this device: one more step along both paths, logits compared
    diff = (model.decode_step(state, fed) - decoder.step(replay_state, fed)).abs().max()
    check = {"max_abs_diff": float(diff), "same_token": all(same)}
    decoder.replay(max(1, int(0.5 / min(replayed))))  # back to back, the same step: ~0.5 s raises the clocks
    n = 4 * steps
    t = time.perf_counter()
    decoder.replay(n)
    replay_ms = (time.perf_counter() - t) / n * 1e3
    # generate's greedy path: two replayed steps in flight; the eager state follows the same ids
    t = time.perf_counter()
    flight = decoder.greedy_steps(replay_state, token, flight_steps)[0]
    flight_ms = (time.perf_counter() - t) / flight_steps * 1e3
    fed = torch.cat([token, flight[:-1]])
    eager = torch.cat([model.decode_step(state, fed[i:i + 1]).argmax(-1) for i in range(flight_steps)])
    check["flight_same_tokens"] = bool(torch.equal(eager, flight))
    decoder.close()
    token = flight[-1:]
    profile = replay_profile(be, model, replay_state, token, steps)
    phases = attention_phases(be, model, replay_state, token, steps) if be.attn_clock else None
    return {"wall_ms": statistics.median(walls) * 1e3, "wall_ms_spread": [min(walls) * 1e3, max(walls) * 1e3],
            "replayed_wall_ms": statistics.median(replayed) * 1e3,
            "replayed_wall_ms_spread": [min(replayed) * 1e3, max(replayed) * 1e3],
            "flight_wall_ms": flight_ms, "flight_steps": flight_steps,
            "replay_ms": replay_ms, "replays_timed": n, "replay_vs_eager": check,
            "gpu_ms": statistics.median(gpus), "gpu_ms_spread": [min(gpus), max(gpus)],
            "last_step_kernels_ms": {k: round(v, 4) for k, (v, _) in be.kernel_times().items()},
            "replay_kernels": profile, "attn_phases": phases}, token


def decode_run(be: VulkanBackend, name: str, config: dict, overrides: dict,
               prompt: int, steps: int, flight_steps: int, variants: list, seed: int = 0,
               same_context: bool = False) -> dict:
    from llmopt.engine.config import ModelArgs
    from llmopt.engine.model import Model
    from llmopt.engine.weights import expected_shapes

    config = dict(config, **overrides)
    args = ModelArgs.from_hf(config, where=name)
    rng = np.random.default_rng(seed)
    tensors, weight_bytes = {}, 0
    t0 = time.perf_counter()
    for tname, shape in expected_shapes(args).items():
        if len(shape) == 2:
            tensors[tname] = random_int4(shape, rng)
            read_per_token = tname != "embed_tokens.weight" or args.tie_embeddings  # the table is only gathered
            weight_bytes += tensors[tname].nbytes if read_per_token else 0
        else:
            tensors[tname] = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 0.02)
            weight_bytes += 4 * int(np.prod(shape))
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        model = Model(args, tensors, Path(folder), backend=be)
        model.static_decode = False  # decode_step stays eager; the replayed step is made explicitly below
        load_s = time.perf_counter() - t0
        del tensors
        ids = torch.randint(0, args.vocab_size, (1, prompt))
        # two states fed the same tokens: eager and replayed steps alternate (the machine's speed drifts); with
        # same_context every variant decodes from the prompt (copies of the states), else each goes on from the last
        rounds = 1 if same_context else len(variants)
        per_round = steps + 3 + flight_steps  # tokens each state decodes in time_variant
        logits, state = model.prefill(ids, max_len=prompt + rounds * per_round + 4)
        _, replay_state = model.prefill(ids, max_len=state.max_len)
        be.synchronize()
        token = logits.argmax(-1)
        runs = []
        defaults = {key: getattr(be, key) for key in VARIANT_KEYS}
        for variant in variants:
            for key in VARIANT_KEYS:
                setattr(be, key, variant.get(key, defaults[key]))
            timing_only = be.decode_chain == "no barriers"
            try:
                if timing_only or same_context:  # on copies of the states: the cache slots they write lie past the
                    # originals' next slot, rewritten before anything reads them
                    run, _ = time_variant(be, model, clone(state), clone(replay_state), token, steps,
                                          flight_steps)
                    for cache in replay_state.caches if timing_only else ():  # wrong results: attention counters zeroed
                        if getattr(cache, "counters", None) is not None:
                            be.dev.upload(cache.counters, np.zeros(cache.counters.nbytes // 4, np.uint32))
                    be.synchronize()
                else:
                    run, token = time_variant(be, model, state, replay_state, token, steps, flight_steps)
            except LlmoptError as err:  # e.g. a chain timing out on this device: the other variants still run
                print(f"    variant {variant['name']}: failed: {err}")
                runs.append({"name": variant["name"], "error": str(err)})
                continue
            runs.append({"name": variant["name"], **{key: getattr(be, key) for key in VARIANT_KEYS}, **run,
                         "timing_only": timing_only})
            check = run["replay_vs_eager"]
            print(f"    variant {variant['name']} ({', '.join(f'{k}={getattr(be, k)}' for k in VARIANT_KEYS)}): "
                  f"wall eager {run['wall_ms']:.2f} ms, replayed {run['replayed_wall_ms']:.2f} ms, "
                  f"replayed 2 in flight {run['flight_wall_ms']:.2f} ms; "
                  f"GPU: eager kernels {run['gpu_ms']:.2f} ms, replayed back to back {run['replay_ms']:.2f} ms; "
                  f"replayed vs eager logits: max |diff| {check['max_abs_diff']:.1e}, "
                  f"same token {check['same_token']}, "
                  f"2 in flight same tokens {check['flight_same_tokens']}"
                  + (" (timing only: results not checked)" if timing_only else ""))
        for key in VARIANT_KEYS:  # the next model starts from the device's defaults, not the last variant
            setattr(be, key, defaults[key])
        del model, state, replay_state
    # float32 keys and values read a token at the flight's middle context, averaged over the rounds
    kv_tokens = prompt + (rounds - 1) * per_round / 2 + steps + 3 + flight_steps / 2
    kv_bytes = round(2 * args.n_layers * kv_tokens * args.n_kv_heads * args.head_dim * 4)
    best = min((r for r in runs if "error" not in r and not r["timing_only"]), key=lambda r: r["flight_wall_ms"])
    keys = ("wall_ms", "wall_ms_spread", "replayed_wall_ms", "replayed_wall_ms_spread", "flight_wall_ms", "gpu_ms",
            "gpu_ms_spread", "replay_ms", "last_step_kernels_ms")
    return {"model": name, "layers": args.n_layers, "vocab": args.vocab_size, "prompt": prompt, "steps": steps,
            "flight_steps": flight_steps,
            "same_context": same_context,
            "load_s": load_s, "bytes_per_token": weight_bytes + kv_bytes, "variants": runs, **{k: best[k] for k in keys},
            "best_variant": {k: best[k] for k in VARIANT_KEYS}}


SWEEP_SHAPES = ("gate/up", "down", "k/v", "o", "lm_head", "q+k+v fused", "gate+up fused")
REAL_PATHS = ("vulkan-eager", "vulkan-replayed", "vulkan-2-in-flight", "cpu-fast", "cpu-reference")


def real_side_by_side(folder: Path, steps: int, paths: list[str], rounds: int = 2) -> list[dict]:
    """Greedy decode tok/s of a real model folder along each path, one after the other in this process.

    Vulkan eager and replayed share one loaded model and alternate ``rounds`` times (the machine's load drifts);
    each round prefills the same prompt and decodes ``steps`` tokens with ``Model.decode_greedy`` (eager: logits
    back, argmax on the host; replayed: argmax on the device), or for ``vulkan-2-in-flight`` one such step (it
    records the replayed step) then ``Model.decode_greedy_steps`` (two replayed steps in flight, as ``generate``),
    timed as a whole: its mean step counts once a round. Median step time over all rounds."""
    from llmopt.backends.cpu import CpuBackend
    from llmopt.engine import load_model

    prompt = "The history of the city of Rome begins"
    loaded = {}
    if any(p.startswith("vulkan") for p in paths):
        vk_model = load_model(folder, backend=VulkanBackend())
        loaded.update({p: vk_model for p in paths if p.startswith("vulkan")})
    for label, quant in (("cpu-fast", None), ("cpu-reference", "reference")):
        if label in paths:
            loaded[label] = load_model(folder, backend=CpuBackend(quant=quant) if quant else CpuBackend())
    walls = {p: [] for p in paths}
    tokens = {}
    for _ in range(rounds):
        for label in paths:
            model = loaded[label]
            model.static_decode = label != "vulkan-eager"
            ids = model.tokenizer.encode(prompt)
            logits, state = model.prefill([ids], max_len=len(ids) + steps + 4)
            token, out = logits.argmax(-1), []
            for i in range(1 if label == "vulkan-2-in-flight" else steps):
                t = time.perf_counter()
                token = model.decode_greedy(state, token)
                if i:  # the first step records the replayed step (and creates pipelines)
                    walls[label].append(time.perf_counter() - t)
                out.append(int(token[0]))
            if label == "vulkan-2-in-flight":
                t = time.perf_counter()
                out += model.decode_greedy_steps(state, token, steps - 1)[0].tolist()
                walls[label].append((time.perf_counter() - t) / (steps - 1))
            tokens[label] = out
            print(f"  {label:16s} {1 / statistics.median(walls[label]):7.3f} tok/s so far ({state.decode_path})")
    rows = [{"path": p, "decode_tok_s": 1 / statistics.median(walls[p]), "step_s": walls[p], "tokens": tokens[p],
             "tokens_equal_first": tokens[p] == tokens[paths[0]]} for p in paths]
    for r in rows:
        print(f"| {r['path']} | {r['decode_tok_s']:.3f} | {r['decode_tok_s'] / rows[0]['decode_tok_s']:.2f}x | "
              f"{'identical' if r['tokens_equal_first'] else 'DIFFERENT'} |")
    return rows


def print_decode_table(rows: list[dict]) -> None:
    print("| model | GB/token | ceiling tok/s | wall eager | wall replayed | replayed, 2 in flight | GPU eager kernels "
          "| GPU replayed back to back | replayed wall of ceiling | 2 in flight of ceiling |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k]:.1f}" if r[k] else "n/a"
                 for k in ("wall_tok_s", "replayed_wall_tok_s", "flight_wall_tok_s", "gpu_tok_s", "replay_tok_s")]
        print(f"| {r['model']} | {r['bytes_per_token'] / 1e9:.2f} | {r['ceiling_tok_s']:.0f} | {' | '.join(cells)} | "
              f"{100 * r['replayed_wall_tok_s'] / r['ceiling_tok_s']:.1f}% | "
              f"{100 * r['flight_wall_tok_s'] / r['ceiling_tok_s']:.1f}% |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write all numbers here as JSON")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="synthetic models to decode")
    p.add_argument("--layers", type=int, help="override the layer count (smoke runs)")
    p.add_argument("--vocab", type=int, help="override the vocabulary size (smoke runs)")
    p.add_argument("--hidden", type=int, help="override the hidden size (a multiple of the head count and of 128; with "
                   "--intermediate, a narrow model whose step is bound by dispatches: the host overhead replay removes)")
    p.add_argument("--intermediate", type=int, help="override the FFN size")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding (context of the KV reads)")
    p.add_argument("--steps", type=int, default=32, help="eager and replayed decode steps timed per model and variant")
    p.add_argument("--flight-steps", type=int, default=128,
                   help="greedy steps timed with two in flight per variant (default 128: llama-bench's tg128, so the "
                        "run's start and end weigh as they do in the peer's number)")
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the copy-bandwidth buffer")
    p.add_argument("--no-sweep", action="store_true", help="skip the mat-vec specialization sweep")
    p.add_argument("--sweep-reps", type=int, default=50, help="mat-vecs per weight copy, configuration and round")
    p.add_argument("--sweep-rounds", type=int, default=3, help="round-robin rounds of the sweep (fastest kept)")
    p.add_argument("--sweep-shapes", nargs="+", choices=SWEEP_SHAPES, default=list(SWEEP_SHAPES),
                   help="shapes of the mat-vec sweep (default: all)")
    p.add_argument("--sweep-configs", nargs="+", type=int, metavar="I",
                   help="indices into SWEEP of the configurations swept (default: all)")
    p.add_argument("--sweep-hidden", type=int, default=3584,
                   help="hidden size of the sweep's shapes (FFN = hidden * 37 / 7, as Qwen2.5-7B; smaller for smoke runs)")
    p.add_argument("--variants", nargs="+", choices=[v["name"] for v in VARIANTS],
                   help="time only these VARIANTS, in this order (a name may repeat; default: all on a GPU; default, "
                        "int-dot, unfused attention on a CPU device)")
    p.add_argument("--same-context", action="store_true",
                   help="every variant decodes from the prompt (copies of the decode states), so variants compare at "
                        "equal KV length whatever their order; default: each goes on from where the last stopped "
                        "(the context grows 2 * steps + 3 tokens a variant: Gemma 2 9B's attention ~0.2 ms a step "
                        "slower over 13 variants, v19)")
    p.add_argument("--kernel-dir", type=Path, help="SPIR-V from the compile stage (default: compile here with glslc)")
    p.add_argument("--real", type=Path, help="instead: a real model folder, decoded along --paths side by side")
    p.add_argument("--paths", nargs="+", default=list(REAL_PATHS), choices=REAL_PATHS,
                   help="with --real: decode paths timed (vulkan eager / replayed step, cpu-fast, cpu-reference)")
    p.add_argument("--rounds", type=int, default=2, help="with --real: rounds, each path once a round")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step records the replayed step and is not timed)")
    if args.flight_steps < 1:
        p.error("--flight-steps must be at least 1")
    if any(not 0 <= i < len(SWEEP) for i in args.sweep_configs or ()):
        p.error(f"--sweep-configs: indices into SWEEP run from 0 to {len(SWEEP) - 1}")
    for name in args.models if args.hidden else ():
        heads = MODELS[name]["num_attention_heads"]  # a head_dim in the config keeps heads * head_dim apart from hidden
        if args.hidden % 128 or ("head_dim" not in MODELS[name] and args.hidden % heads):
            p.error(f"--hidden {args.hidden}: {name} needs a multiple of 128"
                    + ("" if "head_dim" in MODELS[name] else f" and of its {heads} attention heads"))
    if args.real:
        result = {"real": str(args.real), "date": time.strftime("%Y-%m-%d"),
                  "rows": real_side_by_side(args.real, args.steps, args.paths, args.rounds)}
    else:
        be = VulkanBackend(kernel_dir=args.kernel_dir, profile=True)
        info = be.probe["device"]
        print(f"device: {info['name']} ({info['type']}), subgroup {info['subgroup_size']}, features {be.probe['features']}")
        idot_ok = be.dev.features["integer_dot_product"]  # without it only the float mat-vec runs
        result = {"device": info, "date": time.strftime("%Y-%m-%d")}
        result["copy_gbps"] = copy_bandwidth(be, args.copy_mib << 20)
        ceiling_bw = max(result["copy_gbps"].values())
        print("copy bandwidth (read+write): " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in result["copy_gbps"].items()))
        if not args.no_sweep:
            h = args.sweep_hidden
            f, v = h * 37 // 7 // 128 * 128, args.vocab or 152064
            shapes = {"gate/up": (f, h), "down": (h, f), "k/v": (512, h), "o": (h, h), "lm_head": (v, h),
                      "q+k+v fused": (h + 1024, h), "gate+up fused": (2 * f, h)}
            shapes = {label: shapes[label] for label in args.sweep_shapes}
            configs = [SWEEP[i] for i in args.sweep_configs] if args.sweep_configs else SWEEP
            result["matvec"] = matvec_sweep(be, shapes, np.random.default_rng(1), [c for c in configs if idot_ok or not c[3]],
                                           args.sweep_reps, args.sweep_rounds)
        # lavapipe: this device's defaults, and the int-dot path it does not pick by itself
        variants = VARIANTS if be.probe["device"]["type"] != "cpu" else [{"name": "default"},
                                                                           {"name": "int-dot", "matvec_int_dot": True},
                                                                           {"name": "unfused attention",
                                                                            "fuse_rope_attention": False}]
        if args.variants:
            by_name = {v["name"]: v for v in VARIANTS}
            variants = [by_name[name] for name in args.variants]  # in the order given, repeats allowed (A B A B)
        variants = [v for v in variants if idot_ok or not v.get("matvec_int_dot", be.matvec_int_dot)]
        result["decode"] = []
        for name in args.models:
            overrides = {key: value for key, value in (("num_hidden_layers", args.layers), ("vocab_size", args.vocab),
                         ("hidden_size", args.hidden), ("intermediate_size", args.intermediate)) if value}
            row = decode_run(be, name, MODELS[name], overrides, args.prompt, args.steps, args.flight_steps, variants,
                             same_context=args.same_context)
            row["ceiling_tok_s"] = ceiling_bw * 1e9 / row["bytes_per_token"]
            for key in ("wall", "replayed_wall", "flight_wall", "gpu", "replay"):
                row[f"{key}_tok_s"] = 1e3 / row[f"{key}_ms"] if row[f"{key}_ms"] else None  # no timestamps: None
            result["decode"].append(row)
            save(result, args.out)  # after each model: a run cut short keeps the models it finished
        print_decode_table(result["decode"])
    save(result, args.out)
    return 0


def save(result: dict, out: Path | None) -> None:
    if out:  # atomically: a run killed mid-write leaves the previous model's JSON
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
