#version 450
// Fused gated FFN activation y = act(gate) * up: SwiGLU (silu, Qwen) and GeGLU (gelu_tanh, Gemma).
// Q8 = 1 (rows of F values, F a multiple of WG and WG of 32): y also as x8 rows (x8.glsl), each workgroup
// quantizing its own WG / 32 chunks, for the int-dot mat-vec that reads it (the down projection).
// Dispatch: ceil(n / WG) workgroups (folded).
#include "common.glsl"
#include "chain.glsl"
#include "act.glsl"
#define X8_BITS 4u
#define X8_BINDING 3
#include "x8.glsl"

layout(std430, binding = 0) readonly buffer GBuf { float gate[]; };
layout(std430, binding = 1) readonly buffer UBuf { float up[]; };
layout(std430, binding = 2) writeonly buffer YBuf { float y[]; };
layout(push_constant) uniform Params { uint n; uint kind; uint F; CHAIN_TICKET_MEMBER } p;

void main() {
    const uint i = flat_index();
    if (Q8 != 0u && group_index() * WG >= p.n) return;  // a folded grid overshoots (whole workgroups)
    if (i < p.n) {
        const float v = activation(gate[i], p.kind) * up[i];
        y[i] = v;
        if (Q8 != 0u) x8_vals[gl_LocalInvocationID.x + gl_LocalInvocationID.x / 32u] = v;
    }
    if (Q8 != 0u) {
        const uint first = group_index() * WG;  // rows are whole workgroups: F % WG == 0
        x8_store(first / p.F, p.F, (first % p.F) / 32u, WG / 32u);
    }
}
#include "chain_main.glsl"
