#version 450
// Residual add fused with the RMSNorm that follows it: s = a + b (the new residual stream) and
// y = s / sqrt(mean(s^2) + eps) * (w + offset), offset 1 for Gemma's stored (1 + w). One dispatch and one pass
// over the row instead of an add and a norm that reads the sum back. One workgroup a row.
// PRE_NORM = 1 (Gemma's sandwich norms): b is first normed with its own weight wb (the post-attention or post-FFN
// norm), s = a + rmsnorm(b) * (wb + offset): the post norm, the residual add and the next norm in one dispatch.
// PER > 0: an invocation holds its PER = ceil(F / WG) values of the row in registers, every load (a, b, w, wb)
// issued up front, so the workgroup waits for one memory round trip instead of one a pass; PER = 0 (rows too long
// for registers): the same sums in passes over memory, s read back from where this invocation wrote it.
// The sums are `precise`: no product of the post norm is fused into the add (an FMA would skip the rounding that
// rmsnorm.comp's stored output gets), so PRE_NORM = 1 gives the bits of rmsnorm.comp, add.comp and rmsnorm.comp.
// Q8 = 1 (F a multiple of 32): y also as x8 rows (x8.glsl) for the int-dot mat-vec that reads it.
// Dispatch: rows workgroups (folded).
#include "common.glsl"
#include "chain.glsl"
#define X8_BITS 4u
#define X8_BINDING 5
#include "x8.glsl"

layout(constant_id = 3) const uint PER = 0;
layout(constant_id = 4) const uint PRE_NORM = 0;

layout(std430, binding = 0) readonly buffer ABuf { float a[]; };
layout(std430, binding = 1) readonly buffer BBuf { float b[]; };
layout(std430, binding = 2) readonly buffer WBuf { float wt[]; };
layout(std430, binding = 3) buffer SBuf { float s[]; };
layout(std430, binding = 4) writeonly buffer YBuf { float y[]; };
layout(std430, binding = 6) readonly buffer WbBuf { float wb[]; };  // PRE_NORM's weight
layout(push_constant) uniform Params { uint F; float eps; float offset; uint rows; CHAIN_TICKET_MEMBER } p;

float inv_rms(float sum_sq) { return inversesqrt(wg_sum(sum_sq) / float(p.F) + p.eps); }

void put(uint base, uint i, float sum, float inv, float w) {
    s[base + i] = sum;
    const float v = sum * inv * (w + p.offset);
    y[base + i] = v;
    if (Q8 != 0u) x8_vals[i + i / 32u] = v;
}

void main() {
    const uint tid = gl_LocalInvocationID.x;
    if (group_index() >= p.rows) return;  // a folded grid overshoots
    const uint base = group_index() * p.F;
    if (PER > 0u) {
        precise float va[PER > 0u ? PER : 1u];  // sums as add.comp rounds them (see `precise` above)
        float vb[PER > 0u ? PER : 1u], vw[PER > 0u ? PER : 1u], vp[PER > 0u ? PER : 1u];
        [[unroll]] for (uint j = 0; j < PER; ++j) {  // out-of-row slots hold 0: they add nothing to the sums
            const uint i = min(tid + j * WG, p.F - 1u);
            const bool in_row = tid + j * WG < p.F;
            va[j] = in_row ? a[base + i] : 0.0;
            vb[j] = in_row ? b[base + i] : 0.0;
            vw[j] = wt[i];
            if (PRE_NORM != 0u) vp[j] = wb[i];
        }
        if (PRE_NORM != 0u) {
            float sb = 0.0;
            [[unroll]] for (uint j = 0; j < PER; ++j) sb += vb[j] * vb[j];
            const float inv_b = inv_rms(sb);
            [[unroll]] for (uint j = 0; j < PER; ++j) vb[j] = vb[j] * inv_b * (vp[j] + p.offset);  // as rmsnorm.comp
        }
        float ss = 0.0;
        [[unroll]] for (uint j = 0; j < PER; ++j) { va[j] += vb[j]; ss += va[j] * va[j]; }
        const float inv = inv_rms(ss);
        [[unroll]] for (uint j = 0; j < PER; ++j)
            if (tid + j * WG < p.F) put(base, tid + j * WG, va[j], inv, vw[j]);
    } else {
        float inv_b = 1.0;
        if (PRE_NORM != 0u) {
            float sb = 0.0;
            for (uint i = tid; i < p.F; i += WG) { const float v = b[base + i]; sb += v * v; }
            inv_b = inv_rms(sb);
        }
        float ss = 0.0;
        for (uint i = tid; i < p.F; i += WG) {
            const float bi = PRE_NORM != 0u ? b[base + i] * inv_b * (wb[i] + p.offset) : b[base + i];
            precise const float v = a[base + i] + bi;
            s[base + i] = v;
            ss += v * v;
        }
        const float inv = inv_rms(ss);
        // each invocation reads back only the sums it wrote itself: no barrier needed
        for (uint i = tid; i < p.F; i += WG) put(base, i, s[base + i], inv, wt[i]);
    }
    if (Q8 != 0u) x8_store(group_index(), p.F, 0u, p.F / 32u);
}
#include "chain_main.glsl"
