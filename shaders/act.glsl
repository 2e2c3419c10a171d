// Elementwise activations by kind: 0 silu, 1 gelu_tanh, 2 gelu (erf), 3 quick_gelu.

float erf_approx(float x) {
    // Abramowitz & Stegun 7.1.26, |error| < 1.5e-7: GLSL has no erf.
    float t = 1.0 / (1.0 + 0.3275911 * abs(x));
    float y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-x * x);
    return sign(x) * y;
}

float activation(float v, uint kind) {
    if (kind == 0u) return v / (1.0 + exp(-v));
    if (kind == 1u) {
        float u = 0.7978845608028654 * (v + 0.044715 * v * v * v);
        return 0.5 * v * (1.0 + tanh(clamp(u, -15.0, 15.0)));
    }
    if (kind == 2u) return 0.5 * v * (1.0 + erf_approx(v * 0.7071067811865476));
    return v / (1.0 + exp(-1.702 * v));
}
