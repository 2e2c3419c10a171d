#version 450
// Buffer-to-buffer copy by a compute shader, 16 bytes an invocation (grid-stride): the device's transfer path
// for shaders (the seed's "async transfer"), and the copy-bandwidth ceiling the benchmark compares kernels
// with, next to vkCmdCopyBuffer. Dispatch: any number of workgroups (folded); n4 = bytes / 16.
#include "common.glsl"

layout(std430, binding = 0) readonly buffer SrcBuf { uvec4 src[]; };
layout(std430, binding = 1) writeonly buffer DstBuf { uvec4 dst[]; };
layout(push_constant) uniform Params { uint n4; uint stride; } p;  // stride = invocations in the grid

void main() {
    for (uint i = flat_index(); i < p.n4; i += p.stride) dst[i] = src[i];
}
