#version 450
// LayerNorm over the last dim (vision tower): y = (x - mean) / sqrt(var + eps) * w + b. One workgroup a row.
// Dispatch: rows workgroups (folded).
#include "common.glsl"

layout(std430, binding = 0) readonly buffer XBuf { float x[]; };
layout(std430, binding = 1) readonly buffer WBuf { float wt[]; };
layout(std430, binding = 2) readonly buffer BBuf { float bs[]; };
layout(std430, binding = 3) writeonly buffer YBuf { float y[]; };
layout(push_constant) uniform Params { uint F; float eps; uint rows; } p;

void main() {
    const uint tid = gl_LocalInvocationID.x;
    if (group_index() >= p.rows) return;
    const uint base = group_index() * p.F;
    float s = 0.0;
    for (uint i = tid; i < p.F; i += WG) s += x[base + i];
    const float mean = wg_sum(s) / float(p.F);
    float ss = 0.0;
    for (uint i = tid; i < p.F; i += WG) { const float d = x[base + i] - mean; ss += d * d; }
    const float inv = inversesqrt(wg_sum(ss) / float(p.F) + p.eps);
    for (uint i = tid; i < p.F; i += WG) y[base + i] = (x[base + i] - mean) * inv * wt[i] + bs[i];
}
