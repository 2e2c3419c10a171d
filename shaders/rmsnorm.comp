#version 450
// RMSNorm over each chunk of `group` features (group == F: the whole row; group == head_dim: per-head QK-norm):
// y = x / sqrt(mean(x^2) + eps) * (w + offset), offset 1 for Gemma's stored (1 + w). One workgroup a chunk.
// Q8 = 1 (whole rows, F a multiple of 32): y also as x8 rows (x8.glsl) for the int-dot mat-vec that reads it.
// Dispatch: rows * F / group workgroups (folded).
#include "common.glsl"
#include "chain.glsl"
#define X8_BITS 4u
#define X8_BINDING 3
#include "x8.glsl"

layout(std430, binding = 0) readonly buffer XBuf { float x[]; };
layout(std430, binding = 1) readonly buffer WBuf { float wt[]; };
layout(std430, binding = 2) writeonly buffer YBuf { float y[]; };
layout(push_constant) uniform Params { uint group; float eps; float offset; uint n_chunks; CHAIN_TICKET_MEMBER } p;

void main() {
    const uint tid = gl_LocalInvocationID.x;
    if (group_index() >= p.n_chunks) return;  // a folded grid overshoots
    const uint base = group_index() * p.group;
    float ss = 0.0;
    for (uint i = tid; i < p.group; i += WG) { const float v = x[base + i]; ss += v * v; }
    const float inv = inversesqrt(wg_sum(ss) / float(p.group) + p.eps);
    for (uint i = tid; i < p.group; i += WG) {
        const float v = x[base + i] * inv * (wt[i] + p.offset);
        y[base + i] = v;
        if (Q8 != 0u) x8_vals[i + i / 32u] = v;
    }
    if (Q8 != 0u) x8_store(group_index(), p.group, 0u, p.group / 32u);
}
#include "chain_main.glsl"
