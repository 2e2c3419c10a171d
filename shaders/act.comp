#version 450
// Plain activation y = act(x), kind as in act.glsl (vision MLP: gelu, gelu_tanh, quick_gelu; silu).
// Dispatch: ceil(n / WG) workgroups (folded).
#include "common.glsl"
#include "act.glsl"

layout(std430, binding = 0) readonly buffer XBuf { float x[]; };
layout(std430, binding = 1) writeonly buffer YBuf { float y[]; };
layout(push_constant) uniform Params { uint n; uint kind; } p;

void main() {
    const uint i = flat_index();
    if (i < p.n) y[i] = activation(x[i], p.kind);
}
