#version 450
// Decode matrix-vector product, float x: see matvec_quant.glsl.
#include "matvec_quant.glsl"
