// x as int8 per 32 values, the input of matvec_quant_idot: one quantizer for the mat-vec (which quantizes its own
// x chunk when it gets float x) and for the ops that write x already quantized (Q8 = 1: see X8_BINDING below),
// so both give the same bits. Scale d = max|x| / 127, codes roundEven(x * 127 / max|x|) in -127..127 (an all-zero
// chunk: d = 0, codes 0). Bytes are packed in the order of X8_BITS-bit weight codes (defined by the includer):
// word i * SHIFTS + s holds in byte b the code of value i * PER_WORD + s + SHIFTS * b, i.e. the values a weight
// word's byte lanes hold after a shift of s * X8_BITS (4 bits: codes 0,2,4,6 then 1,3,5,7 of each 8).
//
// Quantized x in memory ("x8 rows", written by x8_store, read by the mat-vec's X_Q8 path; 4-bit order): per row of
// K values (K a multiple of 32), blocks of 4 chunks, 10 uvec4 a block: the 8 code words of chunk j at uvec4s
// 2j and 2j + 1, then (d, qsum) of chunks 0, 1 at uvec4 8 and of chunks 2, 3 at uvec4 9 (d as float bits, qsum the
// chunk's integer code sum, for zero points). Row r starts at uvec4 r * x8_row_vec4s(K).

uint x8_row_vec4s(uint K) { return (K / 32u + 3u) / 4u * 10u; }

void x8_quantize(const vec4 xv[8], out int xq[8], out float xd, out int qsum) {
    const uint PER_WORD = 32u / X8_BITS, SHIFTS = 8u / X8_BITS;
    vec4 xa = abs(xv[0]);
    [[unroll]] for (uint i = 1; i < 8u; ++i) xa = max(xa, abs(xv[i]));
    const float amax = max(max(xa.x, xa.y), max(xa.z, xa.w));
    const float inv = amax > 0.0 ? 127.0 / amax : 0.0;
    qsum = 0;
    [[unroll]] for (uint i = 0; i < X8_BITS; ++i) [[unroll]] for (uint s = 0; s < SHIFTS; ++s) {
        uint packed = 0u;
        [[unroll]] for (uint b = 0; b < 4u; ++b) {
            const uint k = i * PER_WORD + s + SHIFTS * b;
            const int q = clamp(int(roundEven(xv[k / 4u][k % 4u] * inv)), -127, 127);
            qsum += q;
            packed |= uint(q & 0xFF) << (8u * b);
        }
        xq[i * SHIFTS + s] = int(packed);
    }
    xd = amax / 127.0;
}

#ifdef X8_BINDING
// Writing x8 rows (rmsnorm, add_rmsnorm, gated_act, rope_attention, the gated mat-vec): spec constant Q8 = 1 turns
// it on; the op leaves value i of the chunks it quantizes in x8_vals[i + i / 32] (i counted from its first chunk; a
// float of padding every 32: the chunk-per-invocation reads below hit distinct banks), then x8_store quantizes them
// from there. X8_LEN (>= the values + a 32nd where used, else 1) sizes x8_vals. Their constant ids are 1 and 2
// unless the includer, whose own constants hold those, defines X8_Q8_ID and X8_LEN_ID.
#ifndef X8_Q8_ID
#define X8_Q8_ID 1
#define X8_LEN_ID 2
#endif
layout(constant_id = X8_Q8_ID) const uint Q8 = 0;
layout(constant_id = X8_LEN_ID) const uint X8_LEN = 1;
layout(std430, binding = X8_BINDING) writeonly buffer X8Out { uvec4 x8_out[]; };
layout(std430, binding = X8_BINDING) writeonly buffer X8OutWords { uint x8_out_words[]; };
shared float x8_vals[X8_LEN];

// Chunks c0 .. c0 + count - 1 of row `row` of a K-wide activation, from x8_vals.
void x8_store(uint row, uint K, uint c0, uint count) {
    barrier();  // every value is in x8_vals
    for (uint j = gl_LocalInvocationID.x; j < count; j += WG) {
        vec4 xv[8];
        [[unroll]] for (uint i = 0; i < 8u; ++i) {
            const uint v = j * 33u + 4u * i;
            xv[i] = vec4(x8_vals[v], x8_vals[v + 1u], x8_vals[v + 2u], x8_vals[v + 3u]);
        }
        int xq[8];
        float xd;
        int qsum;
        x8_quantize(xv, xq, xd, qsum);
        const uint c = c0 + j;
        const uint blk = row * x8_row_vec4s(K) + (c / 4u) * 10u;
        x8_out[blk + 2u * (c % 4u)] = uvec4(xq[0], xq[1], xq[2], xq[3]);
        x8_out[blk + 2u * (c % 4u) + 1u] = uvec4(xq[4], xq[5], xq[6], xq[7]);
        const uint dq = 4u * (blk + 8u + (c % 4u) / 2u) + 2u * (c % 2u);
        x8_out_words[dq] = floatBitsToUint(xd);
        x8_out_words[dq + 1u] = uint(qsum);
    }
}
#endif
