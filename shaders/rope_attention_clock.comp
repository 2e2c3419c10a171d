#version 450
// rope_attention.glsl with PHASE_CLOCK: every workgroup stamps each phase of the fused decode attention with the
// device's realtime clock and its SM's cycle counter (VK_KHR_shader_clock), for bench/vulkan_decode.py's phase
// table (VulkanBackend.attn_clock; the record layout is in llmopt.backends.vulkan.attention, CLOCK_*).
#define PHASE_CLOCK 1
#include "rope_attention.glsl"
