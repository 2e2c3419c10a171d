#version 450
// Residual add fused with the RMSNorm that follows it: s = a + b (the new residual stream) and
// y = s / sqrt(mean(s^2) + eps) * (w + offset), offset 1 for Gemma's stored (1 + w). One dispatch and one pass
// over the row instead of an add and a norm that reads the sum back. One workgroup a row.
// Q8 = 1 (F a multiple of 32): y also as x8 rows (x8.glsl) for the int-dot mat-vec that reads it.
// Dispatch: rows workgroups (folded).
#include "common.glsl"
#define X8_BITS 4u
#define X8_BINDING 5
#include "x8.glsl"

layout(std430, binding = 0) readonly buffer ABuf { float a[]; };
layout(std430, binding = 1) readonly buffer BBuf { float b[]; };
layout(std430, binding = 2) readonly buffer WBuf { float wt[]; };
layout(std430, binding = 3) buffer SBuf { float s[]; };
layout(std430, binding = 4) writeonly buffer YBuf { float y[]; };
layout(push_constant) uniform Params { uint F; float eps; float offset; uint rows; } p;

void main() {
    const uint tid = gl_LocalInvocationID.x;
    if (group_index() >= p.rows) return;  // a folded grid overshoots
    const uint base = group_index() * p.F;
    float ss = 0.0;
    for (uint i = tid; i < p.F; i += WG) {
        const float v = a[base + i] + b[base + i];
        s[base + i] = v;
        ss += v * v;
    }
    const float inv = inversesqrt(wg_sum(ss) / float(p.F) + p.eps);
    // each invocation reads back only the sums it wrote itself: no barrier needed
    for (uint i = tid; i < p.F; i += WG) {
        const float v = s[base + i] * inv * (wt[i] + p.offset);
        y[base + i] = v;
        if (Q8 != 0u) x8_vals[i + i / 32u] = v;
    }
    if (Q8 != 0u) x8_store(group_index(), p.F, 0u, p.F / 32u);
}
