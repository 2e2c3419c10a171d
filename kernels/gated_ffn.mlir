// gated_ffn: the whole gated FFN of one decoder layer for a few rows (decode), int4 (2/8-bit) packed weights:
//   y = down(act(gate(x)) * up(x)),  act = gelu_tanh (GeGLU, Gemma) or silu (SwiGLU, Qwen)
// The three projections are qgemv.mlir (inlined); the activation and product fuse between them, so the
// [M, F] intermediates never leave the kernel. x [M, H] -> y [M, H]; M is dynamic.
// Params: H F G BITS, SCALE (f16 | bf16 as raw i16), ASYM, ACT (silu | gelu_tanh).
// @include qgemv as @gate with N=${F} K=${H}
// @include qgemv as @up with N=${F} K=${H}
// @include qgemv as @down with N=${H} K=${F}
func.func @main(%x: tensor<?x${H}xf32>,
    %gq: tensor<${F}x${HB}xi8>, %gs: tensor<${F}x${HG}x${ST}>,
    %gz: tensor<${F}x${HG}x${ST}>,  // @if ASYM
    %uq: tensor<${F}x${HB}xi8>, %us: tensor<${F}x${HG}x${ST}>,
    %uz: tensor<${F}x${HG}x${ST}>,  // @if ASYM
    %dq: tensor<${H}x${FB}xi8>, %ds: tensor<${H}x${FG}x${ST}>
    , %dz: tensor<${H}x${FG}x${ST}>  // @if ASYM
    ) -> tensor<?x${H}xf32> {
  %c0 = arith.constant 0 : index
  %m = tensor.dim %x, %c0 : tensor<?x${H}xf32>
  %g = call @gate(%x, %gq, %gs) : (tensor<?x${H}xf32>, tensor<${F}x${HB}xi8>, tensor<${F}x${HG}x${ST}>) -> tensor<?x${F}xf32>  // @if !ASYM
  %u = call @up(%x, %uq, %us) : (tensor<?x${H}xf32>, tensor<${F}x${HB}xi8>, tensor<${F}x${HG}x${ST}>) -> tensor<?x${F}xf32>  // @if !ASYM
  %g = call @gate(%x, %gq, %gs, %gz) : (tensor<?x${H}xf32>, tensor<${F}x${HB}xi8>, tensor<${F}x${HG}x${ST}>, tensor<${F}x${HG}x${ST}>) -> tensor<?x${F}xf32>  // @if ASYM
  %u = call @up(%x, %uq, %us, %uz) : (tensor<?x${H}xf32>, tensor<${F}x${HB}xi8>, tensor<${F}x${HG}x${ST}>, tensor<${F}x${HG}x${ST}>) -> tensor<?x${F}xf32>  // @if ASYM
  %a0 = tensor.empty(%m) : tensor<?x${F}xf32>
  %a = linalg.generic {
      indexing_maps = [affine_map<(m, f) -> (m, f)>, affine_map<(m, f) -> (m, f)>, affine_map<(m, f) -> (m, f)>],
      iterator_types = ["parallel", "parallel"]}
      ins(%g, %u : tensor<?x${F}xf32>, tensor<?x${F}xf32>) outs(%a0 : tensor<?x${F}xf32>) {
  ^bb0(%gv: f32, %uv: f32, %o: f32):
    %one = arith.constant 1.0 : f32
    // @if SILU
    %ng = arith.negf %gv : f32
    %e = math.exp %ng : f32
    %den = arith.addf %one, %e : f32
    %act = arith.divf %gv, %den : f32
    // @endif
    // @if GELU_TANH
    %half = arith.constant 0.5 : f32
    %k0 = arith.constant 0.797884583 : f32
    %k1 = arith.constant 0.044715 : f32
    %g2 = arith.mulf %gv, %gv : f32
    %g3 = arith.mulf %g2, %gv : f32
    %c3 = arith.mulf %k1, %g3 : f32
    %in = arith.addf %gv, %c3 : f32
    %arg = arith.mulf %k0, %in : f32
    %th = math.tanh %arg : f32
    %onep = arith.addf %one, %th : f32
    %hg = arith.mulf %half, %gv : f32
    %act = arith.mulf %hg, %onep : f32
    // @endif
    %r = arith.mulf %act, %uv : f32
    linalg.yield %r : f32
  } -> tensor<?x${F}xf32>
  %y = call @down(%a, %dq, %ds) : (tensor<?x${F}xf32>, tensor<${H}x${FB}xi8>, tensor<${H}x${FG}x${ST}>) -> tensor<?x${H}xf32>  // @if !ASYM
  %y = call @down(%a, %dq, %ds, %dz) : (tensor<?x${F}xf32>, tensor<${H}x${FB}xi8>, tensor<${H}x${FG}x${ST}>, tensor<${H}x${FG}x${ST}>) -> tensor<?x${H}xf32>  // @if ASYM
  return %y : tensor<?x${H}xf32>
}
