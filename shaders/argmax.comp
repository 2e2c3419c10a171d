#version 450
// Greedy token: index of the largest value of each row of logits [rows, n] (lowest index on ties), so
// sampling needs 4 bytes back per sequence instead of the whole vocabulary. Dispatch: rows workgroups (folded).
#include "common.glsl"

layout(std430, binding = 0) readonly buffer XBuf { float x[]; };
layout(std430, binding = 1) writeonly buffer IBuf { uint idx[]; };
layout(push_constant) uniform Params { uint n; uint rows; } p;

shared uint best_i[WG];

void main() {
    const uint tid = gl_LocalInvocationID.x;
    if (group_index() >= p.rows) return;
    const uint base = group_index() * p.n;
    float bv = -1.0 / 0.0;
    uint bi = 0xFFFFFFFFu;
    for (uint i = tid; i < p.n; i += WG) {
        const float v = x[base + i];
        if (v > bv) { bv = v; bi = i; }
    }
    const float mx = wg_max(bv);
    best_i[tid] = (bv == mx) ? bi : 0xFFFFFFFFu;
    barrier();
    for (uint stride = WG / 2; stride > 0; stride >>= 1) {
        if (tid < stride) best_i[tid] = min(best_i[tid], best_i[tid + stride]);
        barrier();
    }
    if (tid == 0) idx[group_index()] = best_i[0];
}
