"""Where the fused decode attention's time goes: the phase table of ``rope_attention_clock.comp``'s stamps.

``VulkanBackend.attn_clock = True`` runs every fused decode attention as ``rope_attention_clock.comp``, whose
workgroups stamp each phase with the realtime clock (device-wide nanoseconds) and their SM's cycle counter;
``VulkanBackend.attention_clock()`` reads the stamps of each layer's last dispatch. ``phase_summary`` turns
samples of those (one a replayed step, each with the step's per-dispatch timestamps where profiled) into medians:

- per workgroup, each phase's duration from the cycle counter (exact inside a workgroup; converted to ns with the
  clock rate measured against the realtime clock over the same workgroups), for the splits holding only cached
  slots, the last split (it also ropes and stores this step's k/v), and the combine of the last to arrive;
- per dispatch, from the realtime clock: the spread of the workgroups' first instructions, the time from the
  first start to the last partials, the combine after them, the whole span, which split arrived last; and, where
  the realtime clock and the timestamp queries share one time base (checked: every dispatch's stamps must fall
  between the timestamp after the command before it and the one after it), the gap from the end of the previous
  command to the first instruction (launch and barrier) and from the last instruction to the timestamp; without
  one, their sum: the interval between the two timestamps less the span of the stamps.

    be.attn_clock = True; ...decode steps...; samples = [(be.attention_clock(), None)]
    print(format_summary(phase_summary(samples)))    # bench/vulkan_decode.py --variants "attn clock"
"""

from __future__ import annotations

import numpy as np

from llmopt.backends.vulkan.attention import (CLOCK_ACTIVE, CLOCK_COMBINER, CLOCK_LAST, CLOCK_PHASES, CLOCK_SINGLE)
from llmopt.errors import LlmoptError

START, ROPE, KEY, SCORES, SOFTMAX, VALUES, ARRIVED, WEIGHTS, COMBINED = range(len(CLOCK_PHASES))
# (phase name, stamp it starts after, stamp it ends with) of a workgroup's own work, then the combiner's
OWN_PHASES = (("rope q (+ this step's k/v)", START, ROPE), ("first key scored", ROPE, KEY),
              ("other scores", KEY, SCORES), ("softmax", SCORES, SOFTMAX), ("value sums + partials", SOFTMAX, VALUES),
              ("arrival atomic", VALUES, ARRIVED))
COMBINE_PHASES = (("combine: split weights", ARRIVED, WEIGHTS), ("combine: outputs", WEIGHTS, COMBINED))


def recording_stamps_ns(dev, rec) -> np.ndarray:
    """The raw timestamps (ns) of profiled recording ``rec``'s last submission, in command order (0: its start)."""
    if rec.labels is None:
        raise LlmoptError("recording_stamps_ns: the recording was not made with profile=True")
    ticks = dev.timestamp_ticks(rec.query_pool, len(rec.labels))
    return ticks.astype(np.float64) * float(dev.info["timestamp_period_ns"])


def dispatch_bounds(stamps_ns: np.ndarray, labels: list, kernel: str = "rope_attention_clock") -> list[tuple]:
    """Per dispatch of ``kernel`` in a profiled recording, in order: (timestamp after the command before it,
    timestamp after it), in ns."""
    return [(stamps_ns[i - 1], stamps_ns[i]) for i, label in enumerate(labels) if label == kernel and i > 0]


def _last_stamp(flags: np.ndarray) -> np.ndarray:
    return np.where(flags & (CLOCK_COMBINER | CLOCK_SINGLE), COMBINED, ARRIVED)


def phase_summary(samples: list[tuple[dict, dict | None]]) -> dict:
    """Medians over ``samples``: each a pair (``attention_clock()`` of one step, {layer: (previous command's end
    timestamp, this dispatch's end timestamp)} in ns, or None). Keys: ``phases_ns`` {group: {phase: median}},
    ``dispatch_ns`` {quantity: median}, ``sm_ghz``, ``realtime_step_ns`` (the smallest nonzero realtime step seen),
    ``last_split_arrived_last`` (fraction of dispatches), ``timestamps_share_clock`` (fraction of dispatches whose
    stamps fall between their timestamps; None without timestamps), ``dispatches``."""
    own = {"cached-slot splits": {}, "last split": {}, "single split": {}}
    combine, timeline = {}, {}
    cycles_sum = ns_sum = 0.0
    steps, last_last, shared, n_dispatch = [], [], [], 0
    for records, bounds in samples:
        for layer, r in records.items():
            flags, rt, cy = r["flags"], r["realtime_ns"], r["cycles"]
            active = (flags & CLOCK_ACTIVE) != 0
            if not active.any():
                raise LlmoptError(f"phase_summary: layer {layer} has no active workgroup (did it run with attn_clock?)")
            n_dispatch += 1
            rows = np.flatnonzero(active)
            last = _last_stamp(flags)
            for i in rows:
                group = ("single split" if flags[i] & CLOCK_SINGLE else
                         "last split" if flags[i] & CLOCK_LAST else "cached-slot splits")
                for name, a, b in OWN_PHASES:
                    if b == ARRIVED and flags[i] & CLOCK_SINGLE:
                        continue
                    own[group].setdefault(name, []).append(float(cy[i, b] - cy[i, a]))
                if flags[i] & CLOCK_COMBINER:
                    for name, a, b in COMBINE_PHASES:
                        combine.setdefault(name, []).append(float(cy[i, b] - cy[i, a]))
                cycles_sum += float(cy[i, last[i]] - cy[i, START])
                ns_sum += float(rt[i, last[i]] - rt[i, START])
            every = np.unique(rt[rt > 0])
            if every.size > 1:
                steps.append(float(np.diff(every).min()))
            first = rt[:, START][rt[:, START] > 0].min()  # inactive workgroups too: they take launch slots
            end = max(rt[i, last[i]] for i in rows)
            values_done = rt[rows, VALUES]
            add = lambda key, value: timeline.setdefault(key, []).append(float(value))  # noqa: E731
            add("first instruction: spread over active workgroups", rt[rows, START].max() - rt[rows, START].min())
            add("first start -> last partials written", values_done.max() - first)
            add("last partials -> combined (arrival + combine)", end - values_done.max())
            add("first start -> combined (span)", end - first)
            multi = rows[(flags[rows] & CLOCK_SINGLE) == 0]
            if multi.size:
                last_to_arrive = multi[np.argmax(r["arrival"][multi])]
                last_last.append(bool(flags[last_to_arrive] & CLOCK_LAST))
            if bounds is not None and layer in bounds:
                prev_end, this_end = bounds[layer]
                ok = prev_end <= first and end <= this_end
                shared.append(ok)
                if ok:
                    add("previous command's end -> first instruction (launch + barrier)", first - prev_end)
                    add("last instruction -> timestamp", this_end - end)
                add("timestamps: previous command's end -> this one's", this_end - prev_end)
                add("that minus the span (launch + drain; holds without a common time base)",
                    (this_end - prev_end) - (end - first))
    if not n_dispatch:
        raise LlmoptError("phase_summary: no samples")
    ghz = cycles_sum / ns_sum if ns_sum > 0 else float("nan")
    to_ns = lambda values: float(np.median(values)) / ghz  # noqa: E731
    phases = {group: {name: to_ns(v) for name, v in d.items()} for group, d in own.items() if d}
    if combine:
        phases["combiner (last to arrive)"] = {name: to_ns(v) for name, v in combine.items()}
    return {"phases_ns": phases, "dispatch_ns": {k: float(np.median(v)) for k, v in timeline.items()},
            "sm_ghz": ghz, "realtime_step_ns": min(steps) if steps else None,
            "last_split_arrived_last": float(np.mean(last_last)) if last_last else None,
            "timestamps_share_clock": float(np.mean(shared)) if shared else None, "dispatches": n_dispatch}


def format_summary(s: dict) -> str:
    """The summary as markdown tables (phases a workgroup, then the dispatch's timeline)."""
    groups = list(s["phases_ns"])
    names = list(dict.fromkeys(name for g in groups for name in s["phases_ns"][g]))
    lines = [f"{s['dispatches']} dispatches; SM clock {s['sm_ghz']:.2f} GHz against the realtime clock "
             f"(its smallest step seen: {s['realtime_step_ns']} ns); the last split (this step's slot) arrived last in "
             f"{s['last_split_arrived_last']} of the split dispatches; stamps inside the timestamps' interval: "
             f"{s['timestamps_share_clock']}",
             "| phase (median ns a workgroup, SM cycles) | " + " | ".join(groups) + " |",
             "|---" * (len(groups) + 1) + "|"]
    for name in names:
        cells = [f"{s['phases_ns'][g][name]:.0f}" if name in s["phases_ns"][g] else "" for g in groups]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["| dispatch timeline (median ns, realtime clock) | |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in s["dispatch_ns"].items()]
    return "\n".join(lines)
