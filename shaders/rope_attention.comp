#version 450
// Decode attention with RoPE and the KV store fused in: the kernel is rope_attention.glsl (its comment says how it
// works); rope_attention_clock.comp is the same kernel with per-phase clock stamps.
#define PHASE_CLOCK 0
#include "rope_attention.glsl"
