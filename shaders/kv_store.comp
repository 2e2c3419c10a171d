#version 450
// Writes this step's keys and values [B, T, F] into cache slots start .. start+T-1 of [B, L, F] (the
// on-device KV cache; F = kv_heads * head_dim). One invocation per element. Dispatch: ceil(B*T*F / WG) workgroups (folded).
#include "common.glsl"

layout(std430, binding = 0) readonly buffer KBuf { float k[]; };
layout(std430, binding = 1) readonly buffer VBuf { float v[]; };
layout(std430, binding = 2) writeonly buffer KCBuf { float kc[]; };
layout(std430, binding = 3) writeonly buffer VCBuf { float vc[]; };
layout(push_constant) uniform Params { uint T, F, L, start, total; } p;

void main() {
    const uint i = flat_index();
    if (i >= p.total) return;
    const uint b = i / (p.T * p.F), t = (i / p.F) % p.T, f = i % p.F;
    const uint dst = (b * p.L + p.start + t) * p.F + f;
    kc[dst] = k[i];
    vc[dst] = v[i];
}
