#version 450
// Writes this step's keys and values [B, T, F] into cache slots start .. start+T-1 of [B, L, F] (the
// on-device KV cache; F = kv_heads * head_dim). One invocation per element. SLOT_FROM_STEP = 1 (replayed
// decode): start is step[0], the cache slot the host writes into the step buffer before each submit.
// Dispatch: ceil(B*T*F / WG) workgroups (folded).
#include "common.glsl"
#include "chain.glsl"

layout(constant_id = 1) const uint SLOT_FROM_STEP = 0;

layout(std430, binding = 0) readonly buffer KBuf { float k[]; };
layout(std430, binding = 1) readonly buffer VBuf { float v[]; };
layout(std430, binding = 2) writeonly buffer KCBuf { float kc[]; };
layout(std430, binding = 3) writeonly buffer VCBuf { float vc[]; };
layout(std430, binding = 4) readonly buffer StepBuf { uint step[]; };  // SLOT_FROM_STEP only
layout(push_constant) uniform Params { uint T, F, L, start, total; CHAIN_TICKET_MEMBER } p;

void main() {
    const uint i = flat_index();
    if (i >= p.total) return;
    const uint b = i / (p.T * p.F), t = (i / p.F) % p.T, f = i % p.F;
    const uint start = SLOT_FROM_STEP != 0u ? step[0] : p.start;
    const uint dst = (b * p.L + start + t) * p.F + f;
    kc[dst] = k[i];
    vc[dst] = v[i];
}
#include "chain_main.glsl"
