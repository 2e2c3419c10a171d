// qgemv: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for a few rows m (decode), W in the llmopt packed format.
//
// W[n, k] = (q[n, k] - z[n, k/G]) * s[n, k/G]. The BITS-bit codes q sit LSB-first in the uint8 rows, the order
// IREE uses for sub-byte tensors, so unpacking is a bitcast of the packed rows to i${BITS}. z is 2^(BITS-1)
// unless ASYM. The scale moves out of the inner loop by summing per group first:
//   p[m, n, g] = sum_j (q[n, g, j] - z[n, g]) * x[m, g, j]        y[m, n] = sum_g s[n, g] * p[m, n, g]
// Params: N K G BITS (2, 4, 8), SCALE (f16, or bf16 as its raw i16 bits), ASYM, BIAS; ROWS makes M static.
// Rendered by llmopt.backends.npu.kernels (template syntax in its docstring).
func.func @main(%x: tensor<${MX}x${K}xf32>, %qw: tensor<${N}x${KB}xi8>, %s: tensor<${N}x${NG}x${ST}>
    , %z: tensor<${N}x${NG}x${ST}>  // @if ASYM
    , %bias: tensor<${N}xf32>  // @if BIAS
    ) -> tensor<${MX}x${N}xf32> {
  %c0 = arith.constant 0 : index
  %zero = arith.constant 0.0 : f32
  %m = tensor.dim %x, %c0 : tensor<${MX}x${K}xf32>
  %qn = flow.tensor.bitcast %qw : tensor<${N}x${KB}xi8> -> tensor<${N}x${K}x${QT}>  // @if PACKED
  %q = tensor.expand_shape %qn [[0], [1, 2]] output_shape [${N}, ${NG}, ${G}] : tensor<${N}x${K}x${QT}> into tensor<${N}x${NG}x${G}x${QT}>  // @if PACKED
  %q = tensor.expand_shape %qw [[0], [1, 2]] output_shape [${N}, ${NG}, ${G}] : tensor<${N}x${K}xi8> into tensor<${N}x${NG}x${G}xi8>  // @if !PACKED
  %xg = tensor.expand_shape %x [[0], [1, 2]] output_shape [${MS}, ${NG}, ${G}] : tensor<${MX}x${K}xf32> into tensor<${MX}x${NG}x${G}xf32>

  %p0 = tensor.empty(${DYN_M}) : tensor<${MX}x${N}x${NG}xf32>
  %pz = linalg.fill ins(%zero : f32) outs(%p0 : tensor<${MX}x${N}x${NG}xf32>) -> tensor<${MX}x${N}x${NG}xf32>
  %p = linalg.generic {
      indexing_maps = [affine_map<(m, n, g, j) -> (m, g, j)>, affine_map<(m, n, g, j) -> (n, g, j)>,
                       affine_map<(m, n, g, j) -> (n, g)>,  // @if ASYM
                       affine_map<(m, n, g, j) -> (m, n, g)>],
      iterator_types = ["parallel", "parallel", "parallel", "reduction"]}
      ins(%xg, %q
          , %z  // @if ASYM
          : tensor<${MX}x${NG}x${G}xf32>, tensor<${N}x${NG}x${G}x${QT}>
          , tensor<${N}x${NG}x${ST}>  // @if ASYM
          ) outs(%pz : tensor<${MX}x${N}x${NG}xf32>) {
  ^bb0(%xv: f32, %qv: ${QT},
       %zv: ${ST},  // @if ASYM
       %acc: f32):
    %qf = arith.uitofp %qv : ${QT} to f32
    %zf = arith.constant ${ZP} : f32  // @if !ASYM
    %zf = arith.extf %zv : f16 to f32  // @if ASYM && !BF16
    %zb = arith.bitcast %zv : i16 to bf16  // @if ASYM && BF16
    %zf = arith.extf %zb : bf16 to f32  // @if ASYM && BF16
    %c = arith.subf %qf, %zf : f32
    %t = arith.mulf %c, %xv : f32
    %r = arith.addf %acc, %t : f32
    linalg.yield %r : f32
  } -> tensor<${MX}x${N}x${NG}xf32>

  %y0 = tensor.empty(${DYN_M}) : tensor<${MX}x${N}xf32>
  %yz = linalg.fill ins(%zero : f32) outs(%y0 : tensor<${MX}x${N}xf32>) -> tensor<${MX}x${N}xf32>
  %y = linalg.generic {
      indexing_maps = [affine_map<(m, n, g) -> (m, n, g)>, affine_map<(m, n, g) -> (n, g)>,
                       affine_map<(m, n, g) -> (m, n)>],
      iterator_types = ["parallel", "parallel", "reduction"]}
      ins(%p, %s : tensor<${MX}x${N}x${NG}xf32>, tensor<${N}x${NG}x${ST}>) outs(%yz : tensor<${MX}x${N}xf32>) {
  ^bb0(%pv: f32, %sv: ${ST}, %acc: f32):
    %sf = arith.extf %sv : f16 to f32  // @if !BF16
    %sb = arith.bitcast %sv : i16 to bf16  // @if BF16
    %sf = arith.extf %sb : bf16 to f32  // @if BF16
    %e = arith.mulf %pv, %sf : f32
    %r = arith.addf %acc, %e : f32
    linalg.yield %r : f32
  } -> tensor<${MX}x${N}xf32>
  return %y : tensor<${MX}x${N}xf32>  // @if !BIAS
  // @if BIAS
  %yb = linalg.generic {indexing_maps = [affine_map<(m, n) -> (n)>, affine_map<(m, n) -> (m, n)>],
                        iterator_types = ["parallel", "parallel"]}
      ins(%bias : tensor<${N}xf32>) outs(%y : tensor<${MX}x${N}xf32>) {
  ^bb0(%bv: f32, %yv: f32):
    %r = arith.addf %yv, %bv : f32
    linalg.yield %r : f32
  } -> tensor<${MX}x${N}xf32>
  return %yb : tensor<${MX}x${N}xf32>
  // @endif
}
