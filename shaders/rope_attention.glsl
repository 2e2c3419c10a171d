// Decode attention with RoPE and the KV store fused in (one query token a sequence): one dispatch does what
// rope(q), rope(k), kv_store and attention.comp do for a decode step.
// Workgroup (kv head h, split c, sequence b) serves the G = H / KV query heads sharing KV head h, so each key and
// value row is read once for the whole group. The visible slots lo .. hi-1 (hi - 1 = this step's slot; lo trims
// to the last `window` slots, 0 = global) are cut into n_active chunks of max(chunk_min, ceil(len / S)) slots,
// S = the grid's y size (fixed when recorded, sized for the longest context), and split c takes chunk c;
// splits past n_active exit at once. Scores (a subgroup a key, lanes over the head dimension; without subgroup
// operations an invocation a key) and their softmax stay in shared memory; then an invocation an output
// (head, dimension) sums the values.
// The race a fused store must avoid: no workgroup reads the cache slot this dispatch writes. The last split,
// the only one whose chunk holds slot hi - 1, ropes the step's k (and takes v) from the inputs into shared
// memory, attends to them from there, and is the one that stores them into the cache; the other splits read
// older slots only. Every workgroup ropes q itself. A decode dispatch is latency-bound (a few workgroups at short
// contexts), so every phase spreads over the whole workgroup (GPUs: 1024 invocations).
// One active split writes the output directly. Otherwise each writes its unnormalised partial (per head: the
// value sum, the max score, the exponential sum) to `part`, then counts itself in `counter[b, h]`; the last to
// arrive combines the partials (log-sum-exp rescaling) into the output and resets the counter for the next
// dispatch. `has_mask` excludes slots whose valid flag [B, mask_len] is 0 (left padding); this step's slot is
// always visible. softcap > 0 applies softcap * tanh(s / softcap) to the scaled scores.
// FROM_STEP = 1 (replayed decode): the slot is step[0] (the host writes it into the step buffer before each
// submit); otherwise the push constant `start`. The cos/sin tables hold this step's row of each sequence (in the
// replayed step: regions of the step buffer the host fills with them), so q's rotation waits for one round trip,
// not for the slot or a position first. Dispatch: (KV, S, B).
// Q8 = 1 (x8.glsl; head_dim a multiple of 32): the workgroup that writes a head's outputs (the combiner, or the
// single split) also writes them as x8 rows for the int-dot o projection: its G * D outputs are the G * D / 32
// whole chunks of row b from chunk h * G * D / 32 on, quantized from the very floats stored to `o`.
// PREFETCH = 1: each team's first cached key and each invocation's first block of values are loaded at the very
// start, beside q and the RoPE rows (they depend on neither q nor the softmax; only cached slots, never this
// step's), so the scores and the value sums wait for no memory round trip of their own at short contexts.
// Chained build (CHAIN, chain.glsl): those loads ahead (load_ahead: the RoPE rows too) are issued before the chain's
// wait for q+k+v. Where the teams' first keys cover the chunk (n_cached <= teams: short contexts), the values past
// the first block are loaded there too, STAGE_PER an invocation, and put in shared memory (`stage`, STAGE floats:
// what the device's shared memory has left, sized by the host; slots that do not fit are read from the cache as
// before), so only q and this step's k/v are read after the wait. (Staging the keys past the teams' first at long
// contexts instead was measured slower on an H100, v20: docs/benchmarks.md.) Why the early loads are safe is said
// at chain_early below.
// PHASE_CLOCK = 1 (a define: rope_attention_clock.comp; needs VK_KHR_shader_clock): invocation 0 of every workgroup
// stamps each phase's end with the realtime clock (device-wide, comparable across workgroups) and its SM's cycle
// counter (exact within the workgroup) into `clk`, a record of CLOCK_REC words a workgroup from word
// `clock_base` on, and the arrival order of the partials; the clock build adds the barriers it needs to stamp a
// phase's end (after the value sums of a single split, after the combine). Record: realtime (lo, hi) of the
// CLOCK_STAMPS stamps, their cycle counts (lo, hi), then arrival index, flags (1 active, 2 holds this step's slot,
// 4 combined, 8 single split), n_active, slots of the chunk. Stamps: 0 first instruction, 1 q roped (and this
// step's k/v stored), 2 invocation 0's first key scored, 3 every score, 4 softmax, 5 value sums and partials
// written, 6 arrival counted, 7 split weights (combiner), 8 outputs combined (combiner or single split).
#if PHASE_CLOCK
#extension GL_ARB_shader_clock : require
#extension GL_EXT_shader_realtime_clock : require
#endif
#include "common.glsl"
#include "chain.glsl"
#define X8_BITS 4u
#define X8_BINDING 12
#include "x8.glsl"

// constant_id 1, 2: x8.glsl's Q8 and X8_LEN
layout(constant_id = 3) const uint FROM_STEP = 0;
layout(constant_id = 4) const uint PREFETCH = 1;  // 0: no loads issued ahead (the form before; measured beside it)
layout(constant_id = 5) const uint STAGE = 1;  // chained build: floats of `stage` (the shared memory left)

const uint MAX_G = 8;        // query heads a KV head (Qwen2.5-7B: 7)
const uint MAX_D = 256;      // head dimension
const uint MAX_GD = 1024;    // G * D
const uint MAX_CHUNK = 256;  // slots a split (the runtime picks S so that every chunk fits)
const uint BLOCK = 16;       // value loads issued together
const uint KEY_BLOCK = 8;    // key loads a lane issues together
const uint STAGE_PER = 4;    // chained build: cached value loads an invocation issues before the wait, for `stage`

layout(std430, binding = 0) readonly buffer QBuf { float q[]; };        // [B, H * D], before RoPE
layout(std430, binding = 1) readonly buffer KBuf { float k[]; };        // [B, KV * D], before RoPE
layout(std430, binding = 2) readonly buffer VBuf { float v[]; };        // [B, KV * D]
layout(std430, binding = 3) readonly buffer CBuf { float cs[]; };       // cos rows [B, D]
layout(std430, binding = 4) readonly buffer SBuf { float sn[]; };       // sin rows [B, D]
layout(std430, binding = 5) buffer KCBuf { float kc[]; };               // key cache [B, L, KV * D]
layout(std430, binding = 6) buffer VCBuf { float vc[]; };               // value cache [B, L, KV * D]
layout(std430, binding = 7) readonly buffer MBuf { uint valid[]; };     // [B, mask_len] (has_mask only)
layout(std430, binding = 8) coherent buffer PBuf { float part[]; };     // [B, KV, S, G, D + 2] partials
layout(std430, binding = 9) coherent buffer NBuf { uint counter[]; };   // [B * KV], zero between dispatches
layout(std430, binding = 10) writeonly buffer OBuf { float o[]; };      // [B, H * D]
layout(std430, binding = 11) readonly buffer StepBuf { uint step[]; };  // FROM_STEP only
// binding 12: x8 rows of o [B, H * D] (x8.glsl's X8Out; Q8 only)
#if PHASE_CLOCK
const uint CLOCK_STAMPS = 9, CLOCK_REC = 4 * CLOCK_STAMPS + 4;
layout(std430, binding = 13) writeonly buffer ClockBuf { uint clk[]; };  // a record a workgroup (see above)
#define STAMP(i) if (tid == 0u) { \
    const uvec2 rt_ = clockRealtime2x32EXT(), cy_ = clock2x32ARB(); \
    clk[rec + 2u * (i)] = rt_.x; clk[rec + 2u * (i) + 1u] = rt_.y; \
    clk[rec + 2u * (CLOCK_STAMPS + (i))] = cy_.x; clk[rec + 2u * (CLOCK_STAMPS + (i)) + 1u] = cy_.y; }
#define CLOCK_INFO(arrival, flags, slots) if (tid == 0u) { \
    clk[rec + 4u * CLOCK_STAMPS] = (arrival); clk[rec + 4u * CLOCK_STAMPS + 1u] = (flags); \
    clk[rec + 4u * CLOCK_STAMPS + 2u] = n_active; clk[rec + 4u * CLOCK_STAMPS + 3u] = (slots); }
#define CLOCK_BARRIER barrier();
#else
#define STAMP(i) {}
#define CLOCK_INFO(arrival, flags, slots) {}
#define CLOCK_BARRIER
#endif

layout(push_constant) uniform Params {
    uint H, KV, D;
    uint L;          // cache slots a sequence
    uint start;      // this step's slot (FROM_STEP = 0)
    uint window;     // 0 = global
    uint has_mask;
    uint mask_len;
    uint chunk_min;
    float scale;
    float softcap;   // 0 = none
    uint clock_base; // PHASE_CLOCK: the first word of this dispatch's records in clk
    CHAIN_TICKET_MEMBER
} p;

shared float qs[MAX_GD];               // the group's roped, scaled queries
shared float kn[MAX_D], vn[MAX_D];     // this step's roped key and value (last split)
shared float sc[MAX_G * MAX_CHUNK];    // scores, then exponentials; in the combine, split weights
shared float hm[MAX_G], hl[MAX_G];     // per head: max score, exponential sum
shared bool combine;

// This workgroup's chunk of the context: slots s0 .. s0 + n - 1, the first n_cached of them cached (the last
// split's last slot is this step's, roped into shared memory); splits from n_active on have none.
struct Chunk { uint start, hi, n_active, s0, n, n_cached; bool last; };

Chunk chunk_of() {
    const uint c = gl_WorkGroupID.y, S = gl_NumWorkGroups.y;
    Chunk t;
    t.start = FROM_STEP != 0u ? step[0] : p.start;
    t.hi = t.start + 1u;
    const uint lo = (p.window > 0u && t.hi > p.window) ? t.hi - p.window : 0u;
    const uint len = t.hi - lo;
    const uint chunk = max(p.chunk_min, (len + S - 1u) / S);
    t.n_active = (len + chunk - 1u) / chunk;
    t.s0 = lo + c * chunk;
    t.n = c < t.n_active ? min(chunk, t.hi - t.s0) : 0u;
    t.last = c == t.n_active - 1u;
    t.n_cached = t.last ? t.n - 1u : t.n;
    return t;
}

#if USE_SUBGROUP
#define TEAMS const uint lane = gl_SubgroupInvocationID, team = gl_SubgroupID, n_teams = gl_NumSubgroups, \
    team_size = gl_SubgroupSize;
#else
#define TEAMS const uint lane = 0u, team = gl_LocalInvocationID.x, n_teams = WG, team_size = 1u;
#endif

// The loads issued ahead (load_ahead), used by main: each team's first key and each invocation's first block of
// values (PREFETCH); in the chained build also its first RoPE rotation's table entries and its share of `stage`.
float key_ahead[KEY_BLOCK], val_ahead[BLOCK];
bool keys_ahead, vals_ahead;
#if CHAIN
float cos_a, cos_b, sin_a, sin_b;  // rows at j and j + D / 2 for j = tid % (D / 2), the rotation of i = tid
shared float stage[STAGE];   // cached value rows of the chunk's slots stage_v0 .. stage_v0 + stage_vals - 1
float stage_ahead[STAGE_PER];  // element tid + u * WG of `stage`
uint stage_v0, stage_vals;
bool staged(uint j) { return j - stage_v0 < stage_vals; }  // unsigned: false for j < stage_v0
float stage_val(uint j, uint d) { return stage[(j - stage_v0) * p.D + d]; }
#else
const float cos_a = 0.0, cos_b = 0.0, sin_a = 0.0, sin_b = 0.0;
bool staged(uint j) { return false; }
float stage_val(uint j, uint d) { return 0.0; }
#endif

void load_ahead(const Chunk t) {
    const uint tid = gl_LocalInvocationID.x, h = gl_WorkGroupID.x, b = gl_WorkGroupID.z;
    const uint G = p.H / p.KV, D = p.D, half_d = p.D / 2u, kvf = p.KV * p.D, trow = b * D;
    TEAMS
    keys_ahead = PREFETCH != 0u && team < t.n_cached;
    vals_ahead = PREFETCH != 0u && tid < G * D && BLOCK <= t.n_cached;
    if (keys_ahead) {
        const uint row = (b * p.L + t.s0 + team) * kvf + h * D;
        TILE_LOOP for (uint u = 0u; u < KEY_BLOCK; ++u) {
            const uint i = lane + u * team_size;
            key_ahead[u] = i < D ? kc[row + i] : 0.0;
        }
    }
    if (vals_ahead) {
        const uint at = (b * p.L + t.s0) * kvf + h * D + tid % D;
        TILE_LOOP for (uint u = 0u; u < BLOCK; ++u) val_ahead[u] = vc[at + u * kvf];
    }
#if CHAIN
    if (tid < G * half_d) {
        const uint j = tid % half_d;
        cos_a = cs[trow + j];
        sin_a = sn[trow + j];
        cos_b = cs[trow + j + half_d];
        sin_b = sn[trow + j + half_d];
    }
    // where every cached key is a team's first: the values past the first block, as many whole rows as `stage` holds
    stage_v0 = PREFETCH != 0u && BLOCK <= t.n_cached ? BLOCK : 0u;  // vals_ahead's block, for every invocation
    stage_vals = t.n_cached <= n_teams ? min(t.n_cached - stage_v0, min(STAGE, STAGE_PER * WG) / D) : 0u;
    TILE_LOOP for (uint u = 0u; u < STAGE_PER; ++u) {
        const uint e = tid + u * WG, j = e / D;
        stage_ahead[u] = j < stage_vals ? vc[(b * p.L + t.s0 + stage_v0 + j) * kvf + h * D + e % D] : 0.0;
    }
#endif
}

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint h = gl_WorkGroupID.x, c = gl_WorkGroupID.y, b = gl_WorkGroupID.z, S = gl_NumWorkGroups.y;
#if PHASE_CLOCK
    const uint rec = p.clock_base + ((b * S + c) * p.KV + h) * CLOCK_REC;
#endif
    STAMP(0u)
    const uint G = p.H / p.KV, D = p.D, half_d = p.D / 2u, kvf = p.KV * p.D;
    const Chunk t = chunk_of();
    const uint start = t.start, hi = t.hi, n_active = t.n_active, s0 = t.s0, n = t.n, n_cached = t.n_cached;
    const bool last = t.last;
    if (c >= n_active) {
        CLOCK_INFO(~0u, 0u, 0u)
        return;
    }
#if !CHAIN
    load_ahead(t);  // the chained build's ran before its wait (chain_early)
#endif
    const uint trow = b * D;
    TEAMS

    for (uint i = tid; i < G * half_d; i += WG) {  // RoPE (rotate-half) on the group's queries
        const uint g = i / half_d, j = i % half_d;
        const uint a = (b * p.H + h * G + g) * D + j;
        const float xa = q[a], xb = q[a + half_d];
        const bool mine = CHAIN != 0 && i == tid;  // its table entries loaded ahead (chained build)
        const float ca = mine ? cos_a : cs[trow + j], sa = mine ? sin_a : sn[trow + j];
        const float cb = mine ? cos_b : cs[trow + j + half_d], sb = mine ? sin_b : sn[trow + j + half_d];
        qs[g * D + j] = (xa * ca - xb * sa) * p.scale;
        qs[g * D + j + half_d] = (xb * cb + xa * sb) * p.scale;
    }
    if (last) {  // this step's key and value: to shared memory for the scores, and into the cache slot
        const uint src = b * kvf + h * D, dst = (b * p.L + start) * kvf + h * D;
        for (uint j = tid; j < half_d; j += WG) {
            const float xa = k[src + j], xb = k[src + j + half_d];
            const bool mine = CHAIN != 0 && j == tid;  // j < half_d: the entries of q's rotation i = tid
            const float ca = mine ? cos_a : cs[trow + j], sa = mine ? sin_a : sn[trow + j];
            const float cb = mine ? cos_b : cs[trow + j + half_d], sb = mine ? sin_b : sn[trow + j + half_d];
            const float ya = xa * ca - xb * sa;
            const float yb = xb * cb + xa * sb;
            kn[j] = ya;
            kn[j + half_d] = yb;
            kc[dst + j] = ya;
            kc[dst + j + half_d] = yb;
        }
        for (uint j = tid; j < D; j += WG) {
            const float x = v[src + j];
            vn[j] = x;
            vc[dst + j] = x;
        }
    }
#if CHAIN
    TILE_LOOP for (uint u = 0u; u < STAGE_PER; ++u) {  // after q's loads: these were issued before the wait
        const uint e = tid + u * WG;
        if (e < stage_vals * D) stage[e] = stage_ahead[u];
    }
#endif
    barrier();
    STAMP(1u)

    // Scores: a team a key, every head of the group at once.
    for (uint j = team; j < n; j += n_teams) {
        const uint s = s0 + j;
        const bool fresh = s == hi - 1u;
        const uint row = (b * p.L + s) * kvf + h * D;
        float dot[MAX_G];
        [[unroll]] for (uint g = 0u; g < MAX_G; ++g) dot[g] = 0.0;
        for (uint i0 = lane; i0 < D; i0 += KEY_BLOCK * team_size) {  // once for a subgroup of 32 and D <= 256
            float key[KEY_BLOCK];
            const bool ahead = keys_ahead && j == team && i0 == lane;
            TILE_LOOP for (uint u = 0u; u < KEY_BLOCK; ++u) {
                const uint i = i0 + u * team_size;
                key[u] = ahead ? key_ahead[u] : i >= D ? 0.0 : fresh ? kn[i] : kc[row + i];
            }
            TILE_LOOP for (uint u = 0u; u < KEY_BLOCK; ++u) {
                const uint i = min(i0 + u * team_size, D - 1u);  // past D: key[u] is 0
                [[unroll]] for (uint g = 0u; g < MAX_G; ++g) if (g < G) dot[g] += qs[g * D + i] * key[u];
            }
        }
        const bool visible = fresh || p.has_mask == 0u || valid[b * p.mask_len + s] != 0u;
        [[unroll]] for (uint g = 0u; g < MAX_G; ++g) {
            if (g < G) {
#if USE_SUBGROUP
                const float d = subgroupAdd(dot[g]);
#else
                const float d = dot[g];
#endif
                const float score = p.softcap > 0.0 ? p.softcap * tanh(clamp(d / p.softcap, -15.0, 15.0)) : d;
                if (lane == 0u) sc[g * MAX_CHUNK + j] = visible ? score : -1.0 / 0.0;
            }
        }
        if (j == 0u) STAMP(2u)
    }
    barrier();
    STAMP(3u)

    // Softmax over the chunk: a team a head.
    for (uint g = team; g < G; g += n_teams) {
        float m = -1.0 / 0.0;
        for (uint j = lane; j < n; j += team_size) m = max(m, sc[g * MAX_CHUNK + j]);
#if USE_SUBGROUP
        m = subgroupMax(m);
#endif
        float l = 0.0;
        for (uint j = lane; j < n; j += team_size) {
            const float e = isinf(m) ? 0.0 : exp(sc[g * MAX_CHUNK + j] - m);  // m = -inf: every slot masked
            sc[g * MAX_CHUNK + j] = e;
            l += e;
        }
#if USE_SUBGROUP
        l = subgroupAdd(l);
#endif
        if (lane == 0u) {
            hm[g] = m;
            hl[g] = l;
        }
    }
    barrier();
    STAMP(4u)

    // Values: an invocation an output (head g, dimension d), over the chunk's slots in blocks of BLOCK whose loads
    // are all issued before they are used (a decode dispatch is latency-bound: one memory round trip a block); a
    // value row is read by the G heads' invocations from the same cache lines.
    const uint pbase = ((b * p.KV + h) * S + c) * G;
    for (uint i = tid; i < G * D; i += WG) {
        const uint g = i / D, d = i % D, w = g * MAX_CHUNK;
        const uint at = (b * p.L + s0) * kvf + h * D + d;
        float acc = last ? sc[w + n - 1u] * vn[d] : 0.0;
        uint j = 0u;
        if (vals_ahead && i == tid) {
            TILE_LOOP for (uint u = 0u; u < BLOCK; ++u) acc += sc[w + u] * val_ahead[u];
            j = BLOCK;
        }
        for (; j + BLOCK <= n_cached; j += BLOCK) {
            float val[BLOCK];
            TILE_LOOP for (uint u = 0u; u < BLOCK; ++u)
                val[u] = staged(j + u) ? stage_val(j + u, d) : vc[at + (j + u) * kvf];
            TILE_LOOP for (uint u = 0u; u < BLOCK; ++u) acc += sc[w + j + u] * val[u];
        }
        for (; j < n_cached; ++j) acc += sc[w + j] * (staged(j) ? stage_val(j, d) : vc[at + j * kvf]);
        if (n_active == 1u) {
            const float y = acc / hl[g];
            o[(b * p.H + h * G + g) * D + d] = y;
            if (Q8 != 0u) x8_vals[i + i / 32u] = y;
        } else {
            part[(pbase + g) * (D + 2u) + d] = acc;
        }
    }
    if (n_active == 1u) {
        if (Q8 != 0u) x8_store(b, p.H * D, h * G * D / 32u, G * D / 32u);
        CLOCK_BARRIER
        STAMP(5u)
        STAMP(8u)
        CLOCK_INFO(~0u, 1u | (last ? 2u : 0u) | 8u, n)
        return;
    }
    for (uint g = tid; g < G; g += WG) {
        part[(pbase + g) * (D + 2u) + D] = hm[g];
        part[(pbase + g) * (D + 2u) + D + 1u] = hl[g];
    }

    // The last split to finish combines every split's partials.
    memoryBarrierBuffer();
    barrier();
    STAMP(5u)
#if PHASE_CLOCK
    if (tid == 0u) {
        const uint arrival = atomicAdd(counter[b * p.KV + h], 1u);
        combine = arrival == n_active - 1u;
        CLOCK_INFO(arrival, 1u | (last ? 2u : 0u) | (combine ? 4u : 0u), n)
    }
#else
    if (tid == 0u) combine = atomicAdd(counter[b * p.KV + h], 1u) == n_active - 1u;
#endif
    barrier();
    STAMP(6u)
    if (!combine) return;
    memoryBarrierBuffer();
    const uint base0 = (b * p.KV + h) * S * G;
    for (uint g = team; g < G; g += n_teams) {  // a team a head: the overall max, then each split's weight
        // each lane's first split's (max, sum) is read once and kept in registers: one round trip to the partials
        // where n_active <= team_size (splits past a lane's first are read again for their weights)
        const uint first_at = (base0 + lane * G + g) * (D + 2u) + D;
        const bool mine = lane < n_active;
        const float mine_m = mine ? part[first_at] : -1.0 / 0.0, mine_l = mine ? part[first_at + 1u] : 0.0;
        float m = mine_m;
        for (uint i = lane + team_size; i < n_active; i += team_size)
            m = max(m, part[(base0 + i * G + g) * (D + 2u) + D]);
#if USE_SUBGROUP
        m = subgroupMax(m);
#endif
        float l = 0.0;
        if (mine) {
            const float w = isinf(mine_m) ? 0.0 : exp(mine_m - m);
            sc[lane * MAX_G + g] = w;
            l = w * mine_l;
        }
        for (uint i = lane + team_size; i < n_active; i += team_size) {
            const uint at = (base0 + i * G + g) * (D + 2u) + D;
            const float w = isinf(part[at]) ? 0.0 : exp(part[at] - m);
            sc[i * MAX_G + g] = w;
            l += w * part[at + 1u];
        }
#if USE_SUBGROUP
        l = subgroupAdd(l);
#endif
        if (lane == 0u) hl[g] = l;
    }
    barrier();
    STAMP(7u)
    for (uint i = tid; i < G * D; i += WG) {
        const uint g = i / D, d = i % D;
        float acc = 0.0;
        uint s = 0u;
        for (; s + BLOCK <= n_active; s += BLOCK) {
            float val[BLOCK];
            TILE_LOOP for (uint u = 0u; u < BLOCK; ++u) val[u] = part[(base0 + (s + u) * G + g) * (D + 2u) + d];
            TILE_LOOP for (uint u = 0u; u < BLOCK; ++u) acc += sc[(s + u) * MAX_G + g] * val[u];
        }
        for (; s < n_active; ++s) acc += sc[s * MAX_G + g] * part[(base0 + s * G + g) * (D + 2u) + d];
        const float y = acc / hl[g];
        o[(b * p.H + h * G + g) * D + d] = y;
        if (Q8 != 0u) x8_vals[i + i / 32u] = y;
    }
    if (Q8 != 0u) x8_store(b, p.H * D, h * G * D / 32u, G * D / 32u);
    if (tid == 0u) counter[b * p.KV + h] = 0u;
    CLOCK_BARRIER
    STAMP(8u)
}
#if CHAIN
// Chained: load_ahead before the wait for q+k+v's ticket. What it reads, and who writes it in this step:
// - the step buffer's slot word and this step's cos/sin rows: the step's prologue copies them from the host,
//   ordered before every body dispatch by the barrier that begins the body; nothing in the body writes them;
// - the key and value cache at cached slots s0 .. s0 + n_cached - 1, all before this step's slot: the only write to
//   this layer's cache in the step is this dispatch's own store at the step's slot (the last split's, after the
//   wait), which no early load reads; the slots read were written by earlier steps' rope_attention (or the prefill),
//   earlier submissions ordered by the same barrier; a dropped step's slot is the next step's, never read early.
// q and this step's k and v, which q+k+v writes, and the valid flags are read only after the wait.
#define CHAIN_EARLY 1
uint chain_early() {
    const Chunk t = chunk_of();
    if (gl_WorkGroupID.y < t.n_active) load_ahead(t);
    return 0u;
}
void chain_keep(uint h) {}  // the loads ahead are used by main itself
#endif
#include "chain_main.glsl"
