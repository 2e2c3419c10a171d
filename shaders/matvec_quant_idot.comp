#version 450
// Decode matrix-vector product with x quantized to int8 and packed 4x8-bit integer dot products (int2/4/8 codes;
// other widths take the float path): see matvec_quant.glsl. Needs shaderIntegerDotProduct on the device.
#define USE_INT_DOT 1
#include "matvec_quant.glsl"
