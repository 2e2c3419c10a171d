// Shared by every shader: the workgroup size as specialization constant 0 and workgroup reductions.
// USE_SUBGROUP (a define, set by the compile stage from the device probe) picks subgroup arithmetic; without it
// the reductions go through shared memory, so devices lacking subgroup operations still run every shader.
#extension GL_EXT_control_flow_attributes : enable
#if USE_SUBGROUP
#extension GL_KHR_shader_subgroup_basic : enable
#extension GL_KHR_shader_subgroup_arithmetic : enable
#endif

// SMALL_CODE (CPU devices): keep big constant-trip loops rolled; lavapipe's LLVM needs minutes for the
// fully unrolled tile loops, while GPUs want them unrolled (accumulators in registers, not local memory).
#if SMALL_CODE
#define TILE_LOOP [[dont_unroll]]
#else
#define TILE_LOOP [[unroll]]
#endif

layout(constant_id = 0) const uint WG = 64;  // invocations per workgroup, a power of two
layout(local_size_x_id = 0, local_size_y = 1, local_size_z = 1) in;

// Grids wider than 65535 workgroups (the guaranteed limit) are folded into y: the flat workgroup index.
uint group_index() { return gl_WorkGroupID.y * gl_NumWorkGroups.x + gl_WorkGroupID.x; }
uint flat_index() { return group_index() * WG + gl_LocalInvocationID.x; }

shared float red_buf[WG];

float wg_sum(float v) {
#if USE_SUBGROUP
    v = subgroupAdd(v);
    if (gl_SubgroupInvocationID == 0) red_buf[gl_SubgroupID] = v;
    barrier();
    float s = 0.0;
    for (uint i = 0; i < gl_NumSubgroups; ++i) s += red_buf[i];
    barrier();
    return s;
#else
    const uint tid = gl_LocalInvocationID.x;
    red_buf[tid] = v;
    barrier();
    for (uint stride = WG / 2; stride > 0; stride >>= 1) {
        if (tid < stride) red_buf[tid] += red_buf[tid + stride];
        barrier();
    }
    float s = red_buf[0];
    barrier();
    return s;
#endif
}

float wg_max(float v) {
#if USE_SUBGROUP
    v = subgroupMax(v);
    if (gl_SubgroupInvocationID == 0) red_buf[gl_SubgroupID] = v;
    barrier();
    float m = red_buf[0];
    for (uint i = 1; i < gl_NumSubgroups; ++i) m = max(m, red_buf[i]);
    barrier();
    return m;
#else
    const uint tid = gl_LocalInvocationID.x;
    red_buf[tid] = v;
    barrier();
    for (uint stride = WG / 2; stride > 0; stride >>= 1) {
        if (tid < stride) red_buf[tid] = max(red_buf[tid], red_buf[tid + stride]);
        barrier();
    }
    float m = red_buf[0];
    barrier();
    return m;
#endif
}
