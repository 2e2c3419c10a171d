#version 450
// Prefill matrix-matrix product Y[m, row0 + n] = sum_k X[x_row(m), k] W[n, k] (+ bias[row0 + n]) for packed
// int2/3/4/8 or float32 (BITS == 32) weights. A workgroup computes a TILE x TILE block of Y, stepping over K in
// slices of 32: it stages the X slice and the dequantized W slice in shared memory, and each invocation
// accumulates TILE * TILE / WG outputs. Dispatch: (ceil(N / TILE), ceil(M / TILE), 1). Fused linears: output
// feature R goes to y below seg1, to y1 below seg2, else to y2 (each a plain [M, width] activation).
#include "common.glsl"

layout(constant_id = 1) const uint TILE = 16;
layout(constant_id = 2) const uint BITS = 4;
layout(constant_id = 3) const uint SCALE_BF16 = 0;
layout(constant_id = 4) const uint HAS_ZEROS = 0;
layout(constant_id = 5) const uint HAS_BIAS = 0;

layout(std430, binding = 0) readonly buffer XBuf { float x[]; };
layout(std430, binding = 1) readonly buffer WBuf { uint w[]; };
layout(std430, binding = 2) readonly buffer SBuf { uint sc[]; };
layout(std430, binding = 3) readonly buffer ZBuf { uint zp[]; };
layout(std430, binding = 4) readonly buffer BBuf { float bias[]; };
layout(std430, binding = 5) writeonly buffer YBuf { float y[]; };
layout(std430, binding = 6) writeonly buffer Y1Buf { float y1[]; };
layout(std430, binding = 7) writeonly buffer Y2Buf { float y2[]; };

layout(push_constant) uniform Params {
    uint K, N, n_out, row0, group, x_step, x_off;
    uint M;       // input rows
    uint seg1, seg2;  // first output features written to y1 and y2 (n_out when unused)
} p;

#include "packed.glsl"

const uint BK = 32;
const uint PER_THREAD = TILE * TILE / WG;
shared float xs[TILE * BK];
shared float ws[TILE * BK];

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint n0 = gl_WorkGroupID.x * TILE;
    const uint m0 = gl_WorkGroupID.y * TILE;
    float acc[PER_THREAD];
    for (uint i = 0; i < PER_THREAD; ++i) acc[i] = 0.0;

    for (uint k0 = 0; k0 < p.K; k0 += BK) {
        TILE_LOOP for (uint i = tid; i < TILE * BK; i += WG) {
            const uint r = i / BK, k = k0 + i % BK;
            const uint m = m0 + r, n = n0 + r;
            xs[i] = (m < p.M && k < p.K) ? x[(m * p.x_step + p.x_off) * p.K + k] : 0.0;
            ws[i] = (n < p.N && k < p.K) ? weight_at(n, k, p.K, p.group) : 0.0;
        }
        barrier();
        TILE_LOOP for (uint i = 0; i < PER_THREAD; ++i) {
            const uint o = tid + i * WG;
            const uint om = o / TILE, on = o % TILE;
            float d = 0.0;
            for (uint k = 0; k < BK; ++k) d += xs[om * BK + k] * ws[on * BK + k];
            acc[i] += d;
        }
        barrier();
    }
    for (uint i = 0; i < PER_THREAD; ++i) {
        const uint o = tid + i * WG;
        const uint m = m0 + o / TILE, n = n0 + o % TILE;
        if (m >= p.M || n >= p.N) continue;
        const uint R = p.row0 + n;
        const float s = acc[i] + (HAS_BIAS != 0 ? bias[R] : 0.0);
        if (R < p.seg1) y[m * p.seg1 + R] = s;
        else if (R < p.seg2) y1[m * (p.seg2 - p.seg1) + R - p.seg1] = s;
        else y2[m * (p.n_out - p.seg2) + R - p.seg2] = s;
    }
}
