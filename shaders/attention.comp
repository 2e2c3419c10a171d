#version 450
// Attention for one (head, query token, sequence) per workgroup, with grouped KV heads (GQA).
// mode 0 (decoder): causal over a KV cache [B, L, KV*D]; query t sits at slot start + t and sees slots
//   lo .. start + t, where lo trims to the last `window` slots (sliding window, 0 = global); `has_mask`
//   excludes slots whose valid flag [B, mask_len] is 0 (left padding); a query always sees its own slot, so
//   padded rows stay finite.
// mode 1 (vision, attention_full): K/V are the step's own [B, T, KV*D]; query t sees keys seg[2t] .. seg[2t+1]-1.
// softcap > 0 applies softcap * tanh(s / softcap) to the scaled scores. Scores live in a scratch row per
// workgroup: pass 1 scores and max, pass 2 exponentials and sum, pass 3 the weighted sum of V.
// SLOT_FROM_STEP = 1 (replayed decode): start is step[0], written by the host into the step buffer before each
// submit, so one recorded dispatch serves every position. Dispatch: (H, T, B).
#include "common.glsl"
#include "chain.glsl"

layout(constant_id = 1) const uint SLOT_FROM_STEP = 0;

layout(std430, binding = 0) readonly buffer QBuf { float q[]; };
layout(std430, binding = 1) readonly buffer KBuf { float kc[]; };
layout(std430, binding = 2) readonly buffer VBuf { float vc[]; };
layout(std430, binding = 3) readonly buffer MBuf { uint aux[]; };   // valid flags (mode 0) or segments (mode 1)
layout(std430, binding = 4) buffer ScratchBuf { float scratch[]; };
layout(std430, binding = 5) writeonly buffer OBuf { float o[]; };
layout(std430, binding = 6) readonly buffer StepBuf { uint step[]; };  // SLOT_FROM_STEP only

layout(push_constant) uniform Params {
    uint T, H, KV, D;
    uint L;          // key rows per sequence in kc/vc
    uint start;      // cache slot of query 0 (mode 0)
    uint window;     // 0 = global
    uint mode;
    uint has_mask;
    uint mask_len;
    uint sl;         // scratch row length (>= every hi)
    float scale;
    float softcap;   // 0 = none
    CHAIN_TICKET_MEMBER
} p;

const uint MAX_D = 256;
shared float qs[MAX_D];

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint h = gl_WorkGroupID.x, t = gl_WorkGroupID.y, b = gl_WorkGroupID.z;
    const uint kvh = h / (p.H / p.KV);
    const uint qrow = (b * p.T + t) * p.H * p.D + h * p.D;
    const uint kstride = p.KV * p.D;
    const uint kbase = b * p.L * kstride + kvh * p.D;
    const uint sbase = ((b * p.T + t) * p.H + h) * p.sl;

    uint lo, hi;
    if (p.mode == 0u) {
        hi = (SLOT_FROM_STEP != 0u ? step[0] : p.start) + t + 1u;
        lo = (p.window > 0u && hi > p.window) ? hi - p.window : 0u;
    } else {
        lo = aux[2u * t];
        hi = aux[2u * t + 1u];
    }

    for (uint d = tid; d < p.D; d += WG) qs[d] = q[qrow + d] * p.scale;
    barrier();

    // Pass 1: a team of invocations per key (a subgroup: coalesced loads of the key row, one subgroupAdd);
    // without subgroup operations, one invocation per key.
#if USE_SUBGROUP
    const uint lane = gl_SubgroupInvocationID, team = gl_SubgroupID, n_teams = gl_NumSubgroups, team_size = gl_SubgroupSize;
#else
    const uint lane = 0u, team = tid, n_teams = WG, team_size = 1u;
#endif
    float local_max = -1.0 / 0.0;
    for (uint s = lo + team; s < hi; s += n_teams) {
        float d = 0.0;
        for (uint i = lane; i < p.D; i += team_size) d += qs[i] * kc[kbase + s * kstride + i];
#if USE_SUBGROUP
        d = subgroupAdd(d);
#endif
        float score = -1.0 / 0.0;
        if (p.mode != 0u || p.has_mask == 0u || aux[b * p.mask_len + s] != 0u || s == hi - 1u) {
            score = p.softcap > 0.0 ? p.softcap * tanh(clamp(d / p.softcap, -15.0, 15.0)) : d;
        }
        if (lane == 0u) scratch[sbase + s] = score;
        local_max = max(local_max, score);
    }
    const float mx = wg_max(local_max);
    memoryBarrierBuffer();
    barrier();

    float local_sum = 0.0;
    for (uint s = lo + tid; s < hi; s += WG) {
        const float e = isinf(mx) ? 0.0 : exp(scratch[sbase + s] - mx);
        scratch[sbase + s] = e;
        local_sum += e;
    }
    const float total = wg_sum(local_sum);
    memoryBarrierBuffer();
    barrier();

    // Pass 3: invocation (part, d) sums every n_parts-th key for dim d; the parts meet in shared memory.
    const float inv = total > 0.0 ? 1.0 / total : 0.0;
    const uint n_parts = WG >= p.D ? WG / p.D : 1u;
    const uint part = tid / p.D;
    for (uint d = tid % p.D; d < p.D && part < n_parts; d += WG) {
        float acc = 0.0, acc2 = 0.0;  // two chains: twice the loads in flight
        uint s = lo + part;
        for (; s + n_parts < hi; s += 2u * n_parts) {
            acc += scratch[sbase + s] * vc[kbase + s * kstride + d];
            acc2 += scratch[sbase + s + n_parts] * vc[kbase + (s + n_parts) * kstride + d];
        }
        if (s < hi) acc += scratch[sbase + s] * vc[kbase + s * kstride + d];
        acc += acc2;
        if (n_parts == 1u) o[qrow + d] = acc * inv;
        else red_buf[part * p.D + d] = acc;
    }
    if (n_parts > 1u) {
        barrier();
        for (uint d = tid; d < p.D; d += WG) {
            float acc = 0.0;
            for (uint i = 0; i < n_parts; ++i) acc += red_buf[i * p.D + d];
            o[qrow + d] = acc * inv;
        }
    }
}
#include "chain_main.glsl"
