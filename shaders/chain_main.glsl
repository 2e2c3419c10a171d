// The main of a chained build (chain.glsl): wait for the ticket, run the shader's own main, signal. A shader may
// define CHAIN_EARLY with chain_early() (loads it issues before the wait: weights, which no dispatch writes) and
// chain_keep() (consumes their result after the work).
#if CHAIN
#undef main
#ifndef CHAIN_EARLY
uint chain_early() { return 0u; }
void chain_keep(uint h) {}
#endif
shared uint chain_skip;

void main() {
    const uint early = chain_early();
    if (gl_LocalInvocationIndex == 0u) {
        uint spins = 0u;
        uint skip = 0u;
        while (chain_count < p.chain_ticket) {
            if (++spins == CHAIN_SPINS) {  // never hang the GPU: report, skip the work, let the rest run
                atomicMax(chain_error, p.chain_ticket + 1u);
                skip = 1u;
                break;
            }
        }
        chain_skip = skip;
    }
    memoryBarrierBuffer();
    barrier();
    if (chain_skip == 0u) chained_main();
    chain_keep(early);
    memoryBarrierBuffer();  // this workgroup's writes are visible before its signal
    barrier();
    if (gl_LocalInvocationIndex == 0u) atomicAdd(chain_count, 1u);
}
#endif
