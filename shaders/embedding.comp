#version 450
// Embedding lookup y[i, :] = table[ids[i], :] * mult from a float32 (BITS == 32) or packed table. A table
// larger than the device's storage-buffer range comes in row pieces: this dispatch holds rows row0 .. row0+N-1
// and writes only the ids that fall there. Dispatch: ceil(n_ids * F / WG) workgroups (folded).
#include "common.glsl"
#include "chain.glsl"

layout(constant_id = 1) const uint BITS = 32;
layout(constant_id = 2) const uint SCALE_BF16 = 0;
layout(constant_id = 3) const uint HAS_ZEROS = 0;

layout(std430, binding = 0) readonly buffer IBuf { uint ids[]; };
layout(std430, binding = 1) readonly buffer WBuf { uint w[]; };
layout(std430, binding = 2) readonly buffer SBuf { uint sc[]; };
layout(std430, binding = 3) readonly buffer ZBuf { uint zp[]; };
layout(std430, binding = 4) writeonly buffer YBuf { float y[]; };
layout(push_constant) uniform Params { uint F, N, row0, group, total; float mult; CHAIN_TICKET_MEMBER } p;

#include "packed.glsl"

void main() {
    const uint i = flat_index();
    if (i >= p.total) return;
    const uint tok = i / p.F, j = i % p.F;
    const uint id = ids[tok];
    if (id < p.row0 || id >= p.row0 + p.N) return;
    y[i] = weight_at(id - p.row0, j, p.F, p.group) * p.mult;
}
#include "chain_main.glsl"
