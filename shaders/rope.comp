#version 450
// Rotary position embedding, rotate-half convention, from host cos/sin tables [rows, D] (covers default,
// scaled and multimodal M-RoPE positions, which differ only in the tables). Each invocation rotates one pair
// (i, i + D/2) of one head of one row. POS_TABLE = 1 (replayed decode): the tables hold every position
// [positions, D] and row r uses table row pos[r], read from the step buffer the host writes before each submit.
// Dispatch: ceil(rows * F / 2 / WG) workgroups (folded).
#include "common.glsl"
#include "chain.glsl"

layout(constant_id = 1) const uint POS_TABLE = 0;

layout(std430, binding = 0) readonly buffer XBuf { float x[]; };
layout(std430, binding = 1) readonly buffer CBuf { float cs[]; };
layout(std430, binding = 2) readonly buffer SBuf { float sn[]; };
layout(std430, binding = 3) writeonly buffer YBuf { float y[]; };
layout(std430, binding = 4) readonly buffer PBuf { uint pos[]; };  // POS_TABLE only
layout(push_constant) uniform Params { uint F; uint D; uint total; CHAIN_TICKET_MEMBER } p;  // total = rows * F / 2

void main() {
    const uint i = flat_index();
    if (i >= p.total) return;
    const uint half_d = p.D / 2u;
    const uint row = i / (p.F / 2u), rem = i % (p.F / 2u);
    const uint head = rem / half_d, j = rem % half_d;
    const uint a = row * p.F + head * p.D + j, b = a + half_d;
    const uint t = (POS_TABLE != 0u ? pos[row] : row) * p.D + j;
    const float xa = x[a], xb = x[b];
    y[a] = xa * cs[t] - xb * sn[t];
    y[b] = xb * cs[t + half_d] + xa * sn[t + half_d];
}
#include "chain_main.glsl"
