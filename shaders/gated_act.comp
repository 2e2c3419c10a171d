#version 450
// Fused gated FFN activation y = act(gate) * up: SwiGLU (silu, Qwen) and GeGLU (gelu_tanh, Gemma).
// Dispatch: ceil(n / WG) workgroups (folded).
#include "common.glsl"
#include "act.glsl"

layout(std430, binding = 0) readonly buffer GBuf { float gate[]; };
layout(std430, binding = 1) readonly buffer UBuf { float up[]; };
layout(std430, binding = 2) writeonly buffer YBuf { float y[]; };
layout(push_constant) uniform Params { uint n; uint kind; } p;

void main() {
    const uint i = flat_index();
    if (i < p.n) y[i] = activation(gate[i], p.kind) * up[i];
}
