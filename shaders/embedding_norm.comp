#version 450
// Embedding lookup with the first block's RMSNorm folded in, written as the folding mat-vecs write theirs
// (matvec_quant.glsl's NORM_OUT = 1; src/llmopt/backends/vulkan/producer_norm.py): the residual stream
// y[i, :] = table[ids[i], :] * mult, the x8 rows of y * (w + offset) before the norm's 1 / rms, and each
// workgroup's sum of y^2, which the int-dot mat-vec reading those rows adds up and scales its sums by (X_RMS).
// It replaces the embedding and the first layer's rmsnorm, a dispatch of one workgroup (~10 us of a decode step
// on an H100, docs/benchmarks.md). Each workgroup owns PER values (whole 32-value chunks) of one row.
// Dispatch: rows * F / PER workgroups (folded).
#include "common.glsl"
#include "chain.glsl"
#define X8_BITS 4u
#define X8_BINDING 7
#define X8_Q8_ID 4
#define X8_LEN_ID 5
#include "x8.glsl"

layout(constant_id = 1) const uint BITS = 32;
layout(constant_id = 2) const uint SCALE_BF16 = 0;
layout(constant_id = 3) const uint HAS_ZEROS = 0;

layout(std430, binding = 0) readonly buffer IBuf { uint ids[]; };
layout(std430, binding = 1) readonly buffer WBuf { uint w[]; };
layout(std430, binding = 2) readonly buffer SBuf { uint sc[]; };
layout(std430, binding = 3) readonly buffer ZBuf { uint zp[]; };
layout(std430, binding = 4) writeonly buffer YBuf { float y[]; };
layout(std430, binding = 5) readonly buffer NBuf { float norm_w[]; };
layout(std430, binding = 6) writeonly buffer PBuf { float parts[]; };
layout(push_constant) uniform Params { uint F, group, rows, per; float mult, offset; CHAIN_TICKET_MEMBER } p;

#include "packed.glsl"

void main() {
    const uint tid = gl_LocalInvocationID.x, g = group_index(), row_parts = p.F / p.per;
    const uint row = g / row_parts, j0 = (g % row_parts) * p.per;
    if (row >= p.rows) return;  // a folded grid overshoots by whole workgroups: the barriers below stay uniform
    const uint id = ids[row];
    float ss = 0.0;
    for (uint i = tid; i < p.per; i += WG) {
        const float v = weight_at(id, j0 + i, p.F, p.group) * p.mult;
        y[row * p.F + j0 + i] = v;
        ss += v * v;
        x8_vals[i + i / 32u] = v * (norm_w[j0 + i] + p.offset);
    }
    ss = wg_sum(ss);
    if (tid == 0u) parts[g] = ss;
    x8_store(row, p.F, j0 / 32u, p.per / 32u);
}
#include "chain_main.glsl"
