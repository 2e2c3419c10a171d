#version 450
// Greedy token: index of the largest value of each row of logits [rows, n] (lowest index on ties; NaNs never win;
// a row with no value above -inf gives 0xFFFFFFFF), so sampling needs 4 bytes back per sequence instead of the
// whole vocabulary. Dispatch: (groups, rows): each of a row's `groups` workgroups reduces its contiguous slice (
// coalesced loads) to (max, lowest index of it) in partials, then counts itself in on the row's arrival counter; the
// LAST workgroup to arrive reduces the partials, writes the id and puts the counter back to 0 (one workgroup a row
// scanning 152064-256000 logits took 32-36 us on an H100; docs/benchmarks.md, v24).
// cap > 0: Gemma's final logit softcap folded in: each value is capped as it is read (logits_softcap.comp's exact
// expression), the capped values compared and written back in place, so the logits end up as that dispatch leaves them.
#include "common.glsl"

layout(std430, binding = 0) buffer XBuf { float x[]; };
layout(std430, binding = 1) writeonly buffer IBuf { uint idx[]; };
layout(std430, binding = 2) coherent buffer PartBuf { uvec2 part[]; };  // [rows, groups]: (max's bits, its index)
layout(std430, binding = 3) coherent buffer ArriveBuf { uint arrivals[]; };  // a row's workgroups in (0 between)
layout(push_constant) uniform Params { uint n; uint rows; uint groups; uint row0; float cap; } p;

shared uint best_i[WG];
shared bool last;

// (bv, bi) of this workgroup's invocations -> the workgroup's (max, lowest index of it), in invocation 0's return
uvec2 wg_best(float bv, uint bi) {
    const uint tid = gl_LocalInvocationID.x;
    const float mx = wg_max(bv);
    best_i[tid] = (bv == mx) ? bi : 0xFFFFFFFFu;
    barrier();
    for (uint stride = WG / 2; stride > 0; stride >>= 1) {
        if (tid < stride) best_i[tid] = min(best_i[tid], best_i[tid + stride]);
        barrier();
    }
    const uvec2 best = uvec2(floatBitsToUint(mx), best_i[0]);
    barrier();
    return best;
}

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint g = gl_WorkGroupID.x, row = gl_WorkGroupID.y;
    if (row >= p.rows) return;
    const uint slice = (p.n + p.groups - 1u) / p.groups;
    const uint begin = g * slice, end = min(p.n, begin + slice);
    const uint base = (p.row0 + row) * p.n;
    float bv = -1.0 / 0.0;
    uint bi = 0xFFFFFFFFu;
    for (uint i = begin + tid; i < end; i += WG) {  // ascending per invocation: its first maximum kept
        float v = x[base + i];
        if (p.cap > 0.0) {
            v = p.cap * tanh(clamp(v / p.cap, -15.0, 15.0));
            x[base + i] = v;
        }
        if (v > bv) { bv = v; bi = i; }
    }
    const uvec2 mine = wg_best(bv, bi);
    const uint slot = (p.row0 + row) * p.groups;
    if (tid == 0u) part[slot + g] = mine;
    memoryBarrierBuffer();  // this workgroup's partial is visible before the count that lets the last one read it
    barrier();
    if (tid == 0u) last = atomicAdd(arrivals[row], 1u) == p.groups - 1u;
    barrier();
    if (!last) return;
    memoryBarrierBuffer();  // the others' partials, counted in before this workgroup, read after the count
    bv = -1.0 / 0.0;
    bi = 0xFFFFFFFFu;
    for (uint j = tid; j < p.groups; j += WG) {  // slices ascend with j: the first of equal maxima has the lowest index
        const uvec2 q = part[slot + j];
        const float v = uintBitsToFloat(q.x);
        if (v > bv || (v == bv && q.y < bi)) { bv = v; bi = q.y; }
    }
    const uvec2 best = wg_best(bv, bi);
    if (tid == 0u) {
        idx[p.row0 + row] = best.y;
        arrivals[row] = 0u;  // every workgroup of this row has counted in: ready for the next dispatch
    }
}
