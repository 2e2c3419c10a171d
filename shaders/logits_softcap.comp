#version 450
// Final logit softcap in place: y = cap * tanh(y / cap) (Gemma 2). Dispatch: ceil(n / WG) workgroups (folded).
#include "common.glsl"
#include "chain.glsl"

layout(std430, binding = 0) buffer YBuf { float y[]; };
layout(push_constant) uniform Params { uint n; float cap; CHAIN_TICKET_MEMBER } p;

void main() {
    const uint i = flat_index();
    if (i < p.n) y[i] = p.cap * tanh(clamp(y[i] / p.cap, -15.0, 15.0));
}
#include "chain_main.glsl"
