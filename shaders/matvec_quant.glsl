// Included by matvec_quant.comp (float x) and matvec_quant_idot.comp (USE_INT_DOT = 1: x as int8).
// Decode matrix-vector product y[m, row0 + r] = sum_j W[r, j] x[m, j] (+ bias[r]) for packed int2/3/4/8 or
// float32 weights (BITS). A workgroup holds WG / SPLIT sets of SPLIT invocations (SPLIT = 0: one set of WG);
// each set owns ROWS rows and strides over them in chunks of 32 codes (BITS words, so one scale per chunk when
// the group is a multiple of 32), reusing each x chunk for all ROWS rows (x and 4/8-bit codes read 16 bytes at
// a time); grid z walks the M input vectors. Dispatch: ceil(N / (ROWS * WG / SPLIT)) workgroups (folded into
// x, y), M in z. SPLIT = 32 (a set per subgroup) gives each invocation several chunks of its rows, more loads in
// flight; on an H200 whole-workgroup sets in many small workgroups still measured faster (docs/benchmarks.md).
// Either way a workgroup's rows are all reduced behind a single barrier.
// USE_INT_DOT (defined to 1 by matvec_quant_idot.comp, its own SPIR-V): for 2-, 4- and 8-bit codes x is int8 per
// 32 values (x8.glsl) and each row chunk takes packed 4x8-bit dot products (OpSDot) against its codes, masked out
// of each word byte-wise: for 4 bits w & 0x0F0F0F0F holds codes 0,2,4,6 and (w >> 4) & 0x0F0F0F0F codes 1,3,5,7,
// which is the order x8.glsl packs x's bytes in; 8-bit codes go in as signed bytes (w ^ 0x80808080 = code - 128,
// the 128 moved into the zero point). Zero points use the chunk's integer sum of x. Per 16 bytes of int4 codes
// that is 8 dot products and 12 integer ops a row instead of 32 int->float conversions and 32 shift/masks. The
// rows' code words (and scales) are loaded before x, so they are in flight while x is read and quantized. x comes
// as float32 and each invocation quantizes its chunk in registers, or (X_Q8 = 1, 4-bit codes, K a multiple of 32)
// already quantized by the op that produced it ("x8 rows", x8.glsl): 40 bytes a chunk instead of 128 and no
// per-workgroup quantization. 3-bit codes stay on the float path.
// Fused linears: rows of several weights concatenated into one, written to up to three outputs: global row R
// (row0 + row) goes to y if R < seg1, to y1 if R < seg2, else to y2, each a plain [M, width] activation.
// Gated (GATED = 1 + activation kind of act.glsl): the weight is [gate; up] (N rows each, up from row N on) and
// y[m, o] = act(gate_o . x + b_o) * (up_o . x + b_{N+o}): a set's ROWS rows are ROWS / 2 gate rows and the
// matching up rows, so the activation runs in the epilogue (one dispatch, no [2N] round trip). Dispatch:
// ceil(2N / (ROWS * WG / SPLIT)) workgroups; ROWS even. With Q8 = 1 (4-bit codes; N and a workgroup's
// SETS * ROWS / 2 outputs multiples of 32) a workgroup's outputs are whole 32-value chunks of y's row, which it
// also writes as x8 rows (x8.glsl) for the down projection's int-dot mat-vec: no gated_act dispatch, and no
// dependency between workgroups.
// Producer norm (NORM_OUT = 1; int4 int-dot, one output, N % 32 == 0, a layout whose SETS * ROWS <= WG outputs a
// workgroup are whole 32-value chunks): the o or down projection also does the residual add and the next RMSNorm's
// per-chunk half: y = residual + W x (+ bias), the new residual; y * (norm_w + offset) as x8 rows (x8.glsl); and the
// workgroup's sum of y^2 into rms_part[m * rms_parts + workgroup] (one slot a workgroup: no atomics, no counter).
// The x8 codes of a chunk do not change when the whole row is scaled by a positive factor, so the norm's 1 / rms is
// left to the readers: X_RMS = 1 (int-dot over x8 rows) adds the row's rms_parts partials (loaded before the main
// loop, reduced with the row sums' barrier) and scales its sums by 1 / sqrt(sum / K + eps) before the bias.
// Sandwich producer norm (NORM_OUT = 2, Gemma's post norm; same layouts): the row needs rms(d) of the whole branch
// d = W x before the add, which no workgroup has alone, so each writes its d (coherent stores), makes it visible
// and counts itself in on the row's arrival counter (binding 13, zero between dispatches); the LAST workgroup to
// arrive finishes the row (sandwich_tail): all its invocations load d, the residual and both gains coalesced
// (TAIL_PER values each, in registers), r = residual + d / rms(d) * (post + offset) is the new residual (y1), and
// r * (norm_w + offset) goes to x8_vals, quantized a chunk an invocation as norm_add_rmsnorm does; one partial (the
// row's sum of r^2) for the X_RMS readers; then it resets the counter for the next dispatch.
// Sandwich grid form (NORM_OUT = 3, chained builds only: a wait that times out reports through the chain's error
// word): every workgroup finishes its own chunks. It keeps its outputs d in registers and stores its partial sum of
// d^2 into its slot (binding 13, coherent), its lowest mantissa bit replaced by a tag; invocation i of every
// workgroup polls slot i (bounded) until it shows this dispatch's tag, and then holds that partial: no fence, no
// counter, one store and the polls on the wait's path. Then each adds the row's partials for rms(d) and does, for
// its own outputs, what NORM_OUT = 1 does: r = residual + d / rms(d) * (post + offset) (the new residual, y1), x8
// rows of r * (norm_w + offset), one partial sum of r^2 a workgroup (X_RMS readers, rms_parts = workgroups).
// Tags: slots are persistent and never reset; dispatches of `groups` workgroups use a region of their own
// (grid_slot_index), where row m's slots 0..groups-1 are each written once by every such dispatch, one dispatch
// after another (a barrier or the chain between them; two steps in flight: the next step's body starts behind its
// prologue's barrier). So all of a row's slots hold one tag between dispatches, a workgroup reads it from its own
// slot (before writing it) and flips it, and a slot shows either the last dispatch's tag or this one's: one bit
// tells them apart. A time-out leaves them unequal: the host zeroes every slot then (reset_arrivals). The partials
// lose their lowest mantissa bit (2^-23 relative). Residency: the wait needs every workgroup of the dispatch
// resident at once; the host takes this form only where the workgroups are at most the device's SMs
// (VK_NV_shader_sm_builtins), one each: under the chain's in-order launch, earlier dispatches' workgroups retire
// without waiting on this one and later ones launch only after all of it, so each SM frees up for one. Elsewhere
// NORM_OUT = 2; the bounded poll is the safety net.
#ifndef USE_INT_DOT
#define USE_INT_DOT 0
#endif
#if USE_INT_DOT
#extension GL_EXT_spirv_intrinsics : require
// OpSDot (SPV_KHR_integer_dot_product; capabilities DotProduct, DotProductInput4x8BitPacked), packed format 0 =
// PackedVectorFormat4x8Bit: the sum of the four signed byte products. glslang 11 has no GL_EXT_integer_dot_product.
spirv_instruction(extensions = ["SPV_KHR_integer_dot_product"], capabilities = [6019, 6018], id = 4450)
int sdot4x8(int a, int b, spirv_literal int packed_format);
#endif
#include "common.glsl"
#include "chain.glsl"
#include "act.glsl"

layout(constant_id = 1) const uint ROWS = 4;
layout(constant_id = 2) const uint BITS = 4;
layout(constant_id = 3) const uint SCALE_BF16 = 0;
layout(constant_id = 4) const uint HAS_ZEROS = 0;
layout(constant_id = 5) const uint HAS_BIAS = 0;
layout(constant_id = 6) const uint SPLIT = 0;  // invocations a row set: a power of two dividing WG; 0 means WG
layout(constant_id = 7) const uint X_Q8 = 0;   // binding 0 holds x8 rows (int-dot, 4-bit codes, K % 32 == 0)
layout(constant_id = 8) const uint GATED = 0;  // 1 + activation kind: gated epilogue over a [gate; up] weight
layout(constant_id = 11) const uint NORM_OUT = 0;  // producer norm: residual add, x8 rows of y * w, partial sums
layout(constant_id = 12) const uint X_RMS = 0;  // x8 rows of an unscaled norm: sums times 1 / rms of the partials
layout(constant_id = 14) const uint TAIL_PER = 1;  // NORM_OUT = 2: values of the row an invocation holds in the tail

#define X8_BITS BITS
#define X8_BINDING 8  // gated or NORM_OUT, Q8 = 1: the output also as x8 rows (4-bit codes, so in 4-bit order)
#define X8_Q8_ID 9
#define X8_LEN_ID 10
#include "x8.glsl"

layout(std430, binding = 0) readonly buffer XBuf { float x[]; };
layout(std430, binding = 0) readonly buffer X4Buf { vec4 x4[]; };   // the same x, 16-byte loads
layout(std430, binding = 0) readonly buffer X8Buf { uvec4 x8[]; };  // X_Q8: x8 rows instead
layout(std430, binding = 1) readonly buffer WBuf { uint w[]; };
layout(std430, binding = 1) readonly buffer W4Buf { uvec4 w4[]; };  // the same codes, 16-byte loads
layout(std430, binding = 2) readonly buffer SBuf { uint sc[]; };
layout(std430, binding = 3) readonly buffer ZBuf { uint zp[]; };
layout(std430, binding = 4) readonly buffer BBuf { float bias[]; };
layout(std430, binding = 5) writeonly buffer YBuf { float y[]; };
layout(std430, binding = 6) writeonly buffer Y1Buf { float y1[]; };
layout(std430, binding = 7) writeonly buffer Y2Buf { float y2[]; };
layout(std430, binding = 9) buffer RmsBuf { float rms_part[]; };  // NORM_OUT writes it, X_RMS reads it
layout(std430, binding = 10) readonly buffer ResBuf { float residual[]; };  // NORM_OUT: [M, N]
layout(std430, binding = 11) readonly buffer NormBuf { float norm_w[]; };   // NORM_OUT: the next norm's gain [N]
layout(std430, binding = 5) coherent buffer DBuf { float d_out[]; };  // NORM_OUT = 2: d, read back by the tail
layout(std430, binding = 12) readonly buffer PostBuf { float post_w[]; };   // NORM_OUT = 2: the post norm's gain [N]
layout(std430, binding = 13) coherent buffer ArriveBuf { uint arrivals[]; };  // NORM_OUT = 2: workgroups in, a row

layout(push_constant) uniform Params {
    uint K;       // input features
    uint N;       // rows in this weight piece (gated: outputs, the gate rows)
    uint n_out;   // features of y (all pieces)
    uint row0;    // first output feature of this piece
    uint group;   // codes per scale
    uint x_step;  // input vector m is row m * x_step + x_off of x
    uint x_off;
    uint seg1;    // first output feature written to y1 (n_out when there is one output)
    uint seg2;    // first output feature written to y2
    uint rms_parts;     // NORM_OUT, X_RMS: partial sums of squares a row (the producer's workgroups a row)
    float eps;          // X_RMS, NORM_OUT = 2: the norm's epsilon
    float norm_offset;  // NORM_OUT: 1 for Gemma-style (1 + w) gains, else 0
    CHAIN_TICKET_MEMBER
} p;

#include "packed.glsl"

const uint SET = SPLIT == 0u ? WG : SPLIT;
const uint SETS = WG / SET;
const uint HALF = ROWS / 2u;
shared float part[ROWS * WG];  // partial sums, row r of invocation t at part[r * WG + t]

// Weight row of a set's row r; `first` is the set's first row (gated: counting gate and up rows, ROWS a set).
// Rows past the end are clamped: computed and discarded.
uint weight_row(uint first, uint r) {
    if (GATED == 0u) return min(first + r, p.N - 1u);
    const uint o = min(first / 2u + r % HALF, p.N - 1u);
    return r < HALF ? o : p.N + o;
}

shared bool tail_last;

// NORM_OUT = 2, after this workgroup's d is stored: the row's last workgroup to arrive finishes row m (see above).
void sandwich_tail(uint m) {
    const uint tid = gl_LocalInvocationID.x;
    memoryBarrierBuffer();  // d's stores are visible before the count that lets the last workgroup read them
    barrier();
    if (tid == 0u) tail_last = atomicAdd(arrivals[m], 1u) == gl_NumWorkGroups.x * gl_NumWorkGroups.y - 1u;
    barrier();
    if (!tail_last) return;
    memoryBarrierBuffer();  // the other workgroups' d, counted in before this one, read after the count
    const uint base = m * p.N;
    precise float r[TAIL_PER];  // rounded as norm_add_rmsnorm's sums: no product fused into the add
    float d[TAIL_PER], res[TAIL_PER], post[TAIL_PER], gain[TAIL_PER];
    [[unroll]] for (uint j = 0; j < TAIL_PER; ++j) {  // every load issued before the first reduction
        const uint i = min(tid + j * WG, p.N - 1u);
        const bool in_row = tid + j * WG < p.N;
        d[j] = in_row ? d_out[base + i] : 0.0;
        res[j] = residual[base + i];
        post[j] = post_w[i];
        gain[j] = norm_w[i];
    }
    float sum_sq = 0.0;
    [[unroll]] for (uint j = 0; j < TAIL_PER; ++j) sum_sq += d[j] * d[j];
    const float inv_d = inversesqrt(wg_sum(sum_sq) / float(p.N) + p.eps);
    sum_sq = 0.0;
    [[unroll]] for (uint j = 0; j < TAIL_PER; ++j) {
        const uint i = tid + j * WG;
        if (i >= p.N) continue;
        r[j] = res[j] + d[j] * inv_d * (post[j] + p.norm_offset);
        sum_sq += r[j] * r[j];
        y1[base + i] = r[j];
        x8_vals[i + i / 32u] = r[j] * (gain[j] + p.norm_offset);
    }
    const float total = wg_sum(sum_sq);
    if (tid == 0u) {
        rms_part[m] = total;
        arrivals[m] = 0u;  // every workgroup of this dispatch has counted in: ready for the next one
    }
    x8_store(m, p.N, 0u, p.N / 32u);
}

#define GRID_ROWS 8u  // MATVEC_MAX_M (backend.py): input rows a slot region holds
layout(std430, binding = 13) coherent volatile buffer SlotBuf { uint grid_slot[]; };  // NORM_OUT = 3: tagged partials
shared uint grid_tag, grid_skip;

// NORM_OUT = 3: the slot of workgroup g of row m among those of dispatches of `groups` workgroups (a region each).
uint grid_slot_index(uint m, uint g, uint groups) {
    return GRID_ROWS * groups * (groups - 1u) / 2u + m * groups + g;
}

// NORM_OUT = 3: this invocation's output d (o == tid < ROWS * SETS) with its residual, post gain and next gain (both
// + offset), and its sum of d^2: every workgroup finishes its own outputs after a grid wait (see above).
void sandwich_grid(uint m, float d, float sum_sq, float res, float post, float gain) {
    const uint tid = gl_LocalInvocationID.x;
    const uint groups = gl_NumWorkGroups.x * gl_NumWorkGroups.y, g = group_index();
    if (X_RMS != 0u) barrier();  // red_buf's row sums are read before wg_sum writes it
    const float mine = wg_sum(sum_sq);  // its barriers also order grid_tag's store (main) before the reads below
    const uint tag = grid_tag;
    if (tid == 0u) grid_slot[grid_slot_index(m, g, groups)] = (floatBitsToUint(mine) & ~1u) | tag;
    uint bits = 0u, skip = 0u;
    if (tid < groups) {  // invocation i waits for slot i's tag (bounded), and so holds its partial
        const uint slot = grid_slot_index(m, tid, groups);
        uint spins = 0u;
        bits = grid_slot[slot];
        while ((bits & 1u) != tag) {
            if (++spins == CHAIN_SPINS) {
                skip = 1u;
                break;
            }
            bits = grid_slot[slot];
        }
    }
    if (tid == 0u) grid_skip = 0u;
    barrier();
    if (skip != 0u) grid_skip = 1u;
    const float parts = tid < groups ? uintBitsToFloat(bits & ~1u) : 0.0;
    const float inv_d = inversesqrt(wg_sum(parts) / float(p.N) + p.eps);  // its barrier publishes grid_skip
    if (grid_skip != 0u) {  // never hang: report (chained builds; the host then zeroes every slot), skip the rest
#if CHAIN
        if (tid == 0u) atomicMax(chain_error, p.chain_ticket + 1u);
#endif
        return;
    }
    const uint per = ROWS * SETS, out0 = g * per;
    sum_sq = 0.0;
    if (tid < per && out0 + tid < p.N) {
        precise float r = res + d * inv_d * post;  // rounded as norm_add_rmsnorm's: no product fused into the add
        y1[m * p.N + out0 + tid] = r;
        sum_sq = r * r;
        x8_vals[tid + tid / 32u] = r * gain;
    }
    const float total = wg_sum(sum_sq);
    if (tid == 0u) rms_part[m * groups + g] = total;
    x8_store(m, p.N, out0 / 32u, out0 < p.N ? min(per, p.N - out0) / 32u : 0u);
}

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint lane = tid % SET;
    const uint first = (group_index() * SETS + tid / SET) * ROWS;
    const uint m = gl_WorkGroupID.z;
    const uint xrow = m * p.x_step + p.x_off;
    const uint xbase = xrow * p.K;
    const uint n_chunks = p.K / 32u;
    const uint row_words = p.K * BITS / 32u;
    const uint groups = p.K / p.group;
    const bool rows_aligned = (row_words & 3u) == 0u;  // rows start on 16 bytes: uvec4 loads

    float acc[ROWS];
    [[unroll]] for (uint r = 0; r < ROWS; ++r) acc[r] = 0.0;
    // X_RMS: this invocation's first two partials of the row, loaded ahead of the main loop and added after it, so
    // their latency hides behind the weight loads (more, where a row has over 2 * WG partials, after the loop)
    const uint rms_base = xrow * p.rms_parts;
    const float rms_a = X_RMS != 0u && tid < p.rms_parts ? rms_part[rms_base + tid] : 0.0;
    const float rms_b = X_RMS != 0u && tid + WG < p.rms_parts ? rms_part[rms_base + tid + WG] : 0.0;
    // NORM_OUT 1, 3 (SETS * ROWS <= WG): invocation o's residual and gains, loaded ahead of the main loop
    const uint norm_row = min(group_index() * ROWS * SETS + tid, p.N - 1u);
    const bool own_norm = (NORM_OUT == 1u || NORM_OUT == 3u) && tid < ROWS * SETS;
    const float res_ahead = own_norm ? residual[m * p.N + norm_row] : 0.0;
    const float gain_ahead = own_norm ? norm_w[norm_row] + p.norm_offset : 0.0;
    const float post_ahead = NORM_OUT == 3u && own_norm ? post_w[norm_row] + p.norm_offset : 0.0;
    if (NORM_OUT == 3u && tid == 0u)  // this dispatch's tag: its own slot's last one, flipped (see above)
        grid_tag = (grid_slot[grid_slot_index(m, group_index(), gl_NumWorkGroups.x * gl_NumWorkGroups.y)] & 1u) ^ 1u;

    for (uint c = lane; c < n_chunks; c += SET) {
        const uint xc = xbase + c * 32u;
        if (BITS == 32) {
            [[unroll]] for (uint r = 0; r < ROWS; ++r) {
                const uint row = weight_row(first, r);
                float d = 0.0;
                [[unroll]] for (uint e = 0; e < 32u; ++e) d += uintBitsToFloat(w[row * p.K + c * 32u + e]) * x[xc + e];
                acc[r] += d;
            }
            continue;
        }
#if USE_INT_DOT
        if (BITS != 3) {
            const uint LANES = BITS == 8u ? 0xFFFFFFFFu : (BITS == 4u ? 0x0F0F0F0Fu : 0x03030303u);
            const uint SHIFTS = 8u / BITS;
            uvec4 wv[ROWS][2];  // the chunk's BITS code words of each row (2 bits: .xy of [0]; 8 bits: both)
            float scale[ROWS], zero[ROWS];
            [[unroll]] for (uint r = 0; r < ROWS; ++r) {
                const uint row = weight_row(first, r);
                const uint wb = row * row_words + c * BITS;
                if (BITS % 4u == 0u && rows_aligned) {
                    wv[r][0] = w4[wb >> 2];
                    if (BITS == 8u) wv[r][1] = w4[(wb >> 2) + 1u];
                } else {
                    [[unroll]] for (uint i = 0; i < BITS; ++i) wv[r][i / 4u][i % 4u] = w[wb + i];
                }
                const uint g = row * groups + (c * 32u) / p.group;
                scale[r] = scale_at(g);
                zero[r] = zero_at(g) - (BITS == 8u ? 128.0 : 0.0);
            }
            int xq[8];
            float xd;
            int qsum;
            if (X_Q8 != 0u) {
                const uint blk = xrow * x8_row_vec4s(p.K) + (c / 4u) * 10u;
                const uvec4 lo = x8[blk + 2u * (c % 4u)], hi = x8[blk + 2u * (c % 4u) + 1u];
                const uvec4 dq = x8[blk + 8u + (c % 4u) / 2u];
                xq = int[8](int(lo.x), int(lo.y), int(lo.z), int(lo.w), int(hi.x), int(hi.y), int(hi.z), int(hi.w));
                xd = uintBitsToFloat((c & 1u) == 0u ? dq.x : dq.z);
                qsum = int((c & 1u) == 0u ? dq.y : dq.w);
            } else {
                vec4 xv[8];
                [[unroll]] for (uint i = 0; i < 8u; ++i) xv[i] = x4[(xc >> 2) + i];
                x8_quantize(xv, xq, xd, qsum);
            }
            [[unroll]] for (uint r = 0; r < ROWS; ++r) {
                int d = 0;
                [[unroll]] for (uint i = 0; i < BITS; ++i) {
                    const uint wd = wv[r][i / 4u][i % 4u];
                    if (BITS == 8u) {
                        d += sdot4x8(int(wd ^ 0x80808080u), xq[i], 0);
                    } else {
                        [[unroll]] for (uint s = 0; s < SHIFTS; ++s)
                            d += sdot4x8(int((wd >> (s * BITS)) & LANES), xq[i * SHIFTS + s], 0);
                    }
                }
                acc[r] += scale[r] * xd * (float(d) - zero[r] * float(qsum));
            }
            continue;
        }
#endif
        vec4 xv[8];
        float xsum = 0.0;
        [[unroll]] for (uint i = 0; i < 8u; ++i) {
            xv[i] = x4[(xc >> 2) + i];
            xsum += dot(xv[i], vec4(1.0));
        }
        [[unroll]] for (uint r = 0; r < ROWS; ++r) {
            const uint row = weight_row(first, r);
            const uint wb = row * row_words + c * BITS;
            float d = 0.0;
            if (BITS == 3) {  // codes straddle words: 32 codes in 3 words
                const uint w0 = w[wb], w1 = w[wb + 1u], w2 = w[wb + 2u];
                uint q[32];
                [[unroll]] for (uint e = 0; e < 10u; ++e) q[e] = (w0 >> (3u * e)) & 7u;
                q[10] = ((w0 >> 30) | (w1 << 2)) & 7u;
                [[unroll]] for (uint e = 0; e < 10u; ++e) q[11u + e] = (w1 >> (3u * e + 1u)) & 7u;
                q[21] = ((w1 >> 31) | (w2 << 1)) & 7u;
                [[unroll]] for (uint e = 0; e < 10u; ++e) q[22u + e] = (w2 >> (3u * e + 2u)) & 7u;
                [[unroll]] for (uint i = 0; i < 8u; ++i)
                    d += dot(vec4(q[4u * i], q[4u * i + 1u], q[4u * i + 2u], q[4u * i + 3u]), xv[i]);
            } else {  // 2, 4, 8 bits: whole codes in each word
                const uint per_word = 32u / BITS;
                [[unroll]] for (uint i = 0; i < BITS; ++i) {
                    const uint wd = (BITS % 4u == 0u && rows_aligned) ? w4[(wb >> 2) + i / 4u][i % 4u] : w[wb + i];
                    [[unroll]] for (uint e = 0; e < per_word; e += 4u) {
                        const uint k = i * per_word + e;  // first of 4 codes, a multiple of 4
                        const vec4 qv = vec4((wd >> (e * BITS)) & CODE_MASK, (wd >> ((e + 1u) * BITS)) & CODE_MASK,
                                             (wd >> ((e + 2u) * BITS)) & CODE_MASK, (wd >> ((e + 3u) * BITS)) & CODE_MASK);
                        d += dot(qv, xv[k / 4u]);
                    }
                }
            }
            const uint g = row * groups + (c * 32u) / p.group;
            acc[r] += scale_at(g) * (d - zero_at(g) * xsum);
        }
    }
    // Tail of a row that is not a multiple of 32 codes (only 2-, 4- and 8-bit rows can have one; never x8 rows).
    for (uint j = n_chunks * 32u + lane; X_Q8 == 0u && j < p.K; j += SET) {
        const float xj = x[xbase + j];
        [[unroll]] for (uint r = 0; r < ROWS; ++r) acc[r] += weight_at(weight_row(first, r), j, p.K, p.group) * xj;
    }

    // One barrier for all rows: each subgroup's sums (or, without subgroups, each invocation's) go to `part`,
    // then invocation r + ROWS * set (mod WG) adds its set's partials of row r. Subgroups are assumed to be aligned
    // runs of invocations, so one lies inside one set whenever it is no larger.
    uint stride = 1u;
#if USE_SUBGROUP
    if (gl_SubgroupSize <= SET) {
        stride = gl_SubgroupSize;
        [[unroll]] for (uint r = 0; r < ROWS; ++r) acc[r] = subgroupAdd(acc[r]);
    }
#endif
    if (tid % stride == 0u) [[unroll]] for (uint r = 0; r < ROWS; ++r) part[r * WG + tid] = acc[r];
    uint rms_slots = WG;  // X_RMS: the partials' sums in red_buf, behind the same barrier
    float rms_sum = rms_a + rms_b;
    for (uint i = tid + 2u * WG; X_RMS != 0u && i < p.rms_parts; i += WG) rms_sum += rms_part[rms_base + i];
#if USE_SUBGROUP
    if (X_RMS != 0u) {
        rms_sum = subgroupAdd(rms_sum);
        if (gl_SubgroupInvocationID == 0u) red_buf[gl_SubgroupID] = rms_sum;
        rms_slots = gl_NumSubgroups;
    }
#else
    if (X_RMS != 0u) red_buf[tid] = rms_sum;
#endif
    barrier();
    float inv_rms = 1.0;
    if (X_RMS != 0u) {
        float total = 0.0;
        for (uint i = 0; i < rms_slots; ++i) total += red_buf[i];
        inv_rms = inversesqrt(total / float(p.K) + p.eps);
    }
    if (GATED != 0u) {  // invocation o = r + HALF * set: output of gate row r and up row r + HALF of its set
        const uint out0 = group_index() * SETS * HALF;  // the workgroup's first output; o counts from it
        for (uint o = tid; o < HALF * SETS; o += WG) {
            const uint r = o % HALF, set = o / HALF;
            float sg = 0.0, su = 0.0;
            for (uint j = set * SET; j < (set + 1u) * SET; j += stride) {
                sg += part[r * WG + j];
                su += part[(r + HALF) * WG + j];
            }
            const uint out_row = out0 + o;
            if (out_row >= p.N) continue;
            sg = sg * inv_rms + (HAS_BIAS != 0 ? bias[out_row] : 0.0);
            su = su * inv_rms + (HAS_BIAS != 0 ? bias[p.N + out_row] : 0.0);
            const float v = activation(sg, GATED - 1u) * su;
            y[m * p.N + out_row] = v;
            if (Q8 != 0u) x8_vals[o + o / 32u] = v;
        }
        if (Q8 != 0u) x8_store(m, p.N, out0 / 32u, out0 < p.N ? min(HALF * SETS, p.N - out0) / 32u : 0u);
        return;
    }
    float sum_sq = 0.0;  // NORM_OUT: this invocation's outputs' squares
    float d_own = 0.0;  // NORM_OUT = 3: its output
    for (uint o = tid; o < ROWS * SETS; o += WG) {  // o: the workgroup's output o, row group * ROWS * SETS + o
        const uint r = o % ROWS, set = o / ROWS;
        float s = 0.0;
        for (uint j = set * SET; j < (set + 1u) * SET; j += stride) s += part[r * WG + j];
        const uint row = (group_index() * SETS + set) * ROWS + r;
        if (row >= p.N) continue;
        const uint R = p.row0 + row;
        s = s * inv_rms + (HAS_BIAS != 0 ? bias[R] : 0.0);
        if (NORM_OUT == 3u) {
            d_own = s;
            sum_sq += s * s;
        } else if (NORM_OUT == 2u) {
            d_out[m * p.N + row] = s;
        } else if (NORM_OUT != 0u) {  // one piece, one output: R == row, p.N == p.n_out; o == tid
            const float h = res_ahead + s;
            y[m * p.N + row] = h;
            sum_sq += h * h;
            if (Q8 != 0u) x8_vals[o + o / 32u] = h * gain_ahead;
        } else if (R < p.seg1) y[m * p.seg1 + R] = s;
        else if (R < p.seg2) y1[m * (p.seg2 - p.seg1) + R - p.seg1] = s;
        else y2[m * (p.n_out - p.seg2) + R - p.seg2] = s;
    }
    if (NORM_OUT == 3u) {
        sandwich_grid(m, d_own, sum_sq, res_ahead, post_ahead, gain_ahead);
    } else if (NORM_OUT == 2u) {
        sandwich_tail(m);
    } else if (NORM_OUT != 0u) {
        if (X_RMS != 0u) barrier();  // red_buf's row sums above are read before wg_sum writes it
        const float total = wg_sum(sum_sq);
        if (tid == 0u) rms_part[m * p.rms_parts + group_index()] = total;
        const uint out0 = group_index() * ROWS * SETS;
        if (Q8 != 0u) x8_store(m, p.N, out0 / 32u, out0 < p.N ? min(ROWS * SETS, p.N - out0) / 32u : 0u);
    }
}
#if CHAIN
// Chained (chain.glsl): the weights never change, so before its wait each invocation loads the code words of its
// rows' first EARLY chunks (the ones its main loop reads first; 4-bit rows on 16 bytes) and keeps the loads alive:
// the next dispatch's DRAM streaming starts while the previous dispatch drains, and its main loop finds them in cache.
layout(constant_id = 13) const uint EARLY = 0;
#define CHAIN_EARLY 1
uint chain_early() {
    const uint row_words = p.K * BITS / 32u;
    if (EARLY == 0u || BITS != 4u || (row_words & 3u) != 0u) return 0u;
    const uint tid = gl_LocalInvocationID.x;
    const uint first = (group_index() * SETS + tid / SET) * ROWS;
    uint h = 0u;
    [[unroll]] for (uint e = 0; e < EARLY; ++e) {
        const uint c = min(tid % SET + e * SET, p.K / 32u - 1u);
        [[unroll]] for (uint r = 0; r < ROWS; ++r) {
            const uvec4 wv = w4[(weight_row(first, r) * row_words + c * 4u) >> 2];
            h ^= wv.x ^ wv.y ^ wv.z ^ wv.w;
        }
    }
    return h;
}
void chain_keep(uint h) {  // a store no input makes: the compiler cannot drop the early loads
    if (h == 0x9E3779B9u && p.K == 0u) y[0] = 0.0;
}
#endif
#include "chain_main.glsl"
