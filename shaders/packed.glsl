// Reading llmopt's packed weights (src/llmopt/quant/format.py): each row is a little-endian bit stream of
// BITS-bit codes in whole 32-bit words; scales (and zero points) are float16 or bfloat16, read here as pairs
// inside 32-bit words so no 16-bit storage feature is needed. BITS == 32 means plain float32 weights.
// Expects buffers `w` (uint words), `sc` and `zp` (uint, two 16-bit values each) and constants BITS,
// SCALE_BF16 and HAS_ZEROS declared by the including shader.

const uint CODE_MASK = (BITS >= 32) ? 0xFFFFFFFFu : ((1u << BITS) - 1u);

float half_value(uint word, uint which) {
    uint h = (word >> (16u * which)) & 0xFFFFu;
    return SCALE_BF16 != 0 ? uintBitsToFloat(h << 16) : unpackHalf2x16(h).x;
}

float scale_at(uint i) { return half_value(sc[i >> 1], i & 1u); }

float zero_at(uint i) { return HAS_ZEROS != 0 ? half_value(zp[i >> 1], i & 1u) : float(1u << (BITS - 1u)); }

// Code of element j in the row starting at word `row_word` (the slow, any-position path).
uint code_at(uint row_word, uint j) {
    uint bit = j * BITS;
    uint wi = row_word + (bit >> 5);
    uint sh = bit & 31u;
    uint q = w[wi] >> sh;
    if (sh + BITS > 32u) q |= w[wi + 1u] << (32u - sh);
    return q & CODE_MASK;
}

// Dequantized element j of row `row` (K elements a row, `group` elements a scale).
float weight_at(uint row, uint j, uint K, uint group) {
    if (BITS == 32) return uintBitsToFloat(w[row * K + j]);
    uint g = row * (K / group) + j / group;
    return (float(code_at(row * (K * BITS / 32u), j)) - zero_at(g)) * scale_at(g);
}
