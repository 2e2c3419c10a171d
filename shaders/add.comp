#version 450
// Residual add y = a + b. Dispatch: ceil(n / WG) workgroups (folded).
#include "common.glsl"

layout(std430, binding = 0) readonly buffer ABuf { float a[]; };
layout(std430, binding = 1) readonly buffer BBuf { float b[]; };
layout(std430, binding = 2) writeonly buffer YBuf { float y[]; };
layout(push_constant) uniform Params { uint n; } p;

void main() {
    const uint i = flat_index();
    if (i < p.n) y[i] = a[i] + b[i];
}
