// Chained dispatches (CHAIN = 1: the "{stem}_chain.spv" build of a shader that includes this header; see
// src/llmopt/backends/vulkan/chain.py). A replayed decode step records its dependent dispatches with no pipeline
// barrier between them; instead every workgroup of dispatch i waits until the step's counter (binding
// CHAIN_BINDING, zeroed before the step) reaches its ticket T_i, the number of workgroups of the step's chained
// dispatches before it, runs, makes its writes visible (memoryBarrierBuffer) and adds 1. The counter reaches T_i
// only once every workgroup of dispatches 0..i-1 has finished, so every earlier write is done (and every read: the
// step's buffers are written once each, below). Only invocation 0 polls; the others wait at the workgroup barrier.
// (Measured no faster on an H200, v19: a back-off between polls, polls spread over 32 or 64 ready flags on lines of
// their own, fences by invocation 0 alone. docs/benchmarks.md.)
// A poll that outlasts CHAIN_SPINS loads sets the error word, skips the work and still signals (the host raises:
// the device does not launch in order).
// Activations stay plain (cached) loads: a chained step writes each activation buffer once (the backend gives it
// fresh buffers, no reuse within the step), after the barrier that begins the step, so no SM can hold a line of
// one from before its producer wrote it. (Coherent activation loads, which bypass the L1, were measured: gate+up's
// workgroups each read the x8 row from L2 once per row set, 23 -> 50 us; docs/benchmarks.md, v18.)
// Include after common.glsl; end the shader with chain_main.glsl; put CHAIN_TICKET_MEMBER last in the
// push-constant block `p` (the ticket, at byte 124 of the 128).
#ifndef CHAIN
#define CHAIN 0
#endif
// the most loads a wait on another workgroup polls (the chain's, matvec_quant's sandwich grid): ~10-30 ms of L2
// round trips on a GPU; under lavapipe's loop limiter (65535 turns)
#define CHAIN_SPINS 32768u
#if CHAIN
#define CHAIN_BINDING 15
#define CHAIN_TICKET_MEMBER layout(offset = 124) uint chain_ticket;
layout(std430, binding = CHAIN_BINDING) coherent volatile buffer ChainBuf { uint chain_count; uint chain_error; };
#define main chained_main  // the shader's main, called by chain_main.glsl's between the wait and the signal
#else
#define CHAIN_TICKET_MEMBER
#endif
