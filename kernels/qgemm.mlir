// qgemm: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for many rows m (prefill), W in the llmopt packed format.
//
// The weight is dequantized, W[n, g, j] = (q[n, g, j] - z[n, g]) * s[n, g], and multiplied by a linalg.matmul
// with a transposed right operand; IREE fuses the dequantization into the matmul dispatch. Unpacking is a
// bitcast of the uint8 rows to i${BITS} (LSB-first, as the packed format stores them). z is 2^(BITS-1) unless ASYM.
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

  %w0 = tensor.empty() : tensor<${N}x${NG}x${G}xf32>
  %w = linalg.generic {
      indexing_maps = [affine_map<(n, g, j) -> (n, g, j)>, affine_map<(n, g, j) -> (n, g)>,
                       affine_map<(n, g, j) -> (n, g)>,  // @if ASYM
                       affine_map<(n, g, j) -> (n, g, j)>],
      iterator_types = ["parallel", "parallel", "parallel"]}
      ins(%q, %s
          , %z  // @if ASYM
          : tensor<${N}x${NG}x${G}x${QT}>, tensor<${N}x${NG}x${ST}>
          , tensor<${N}x${NG}x${ST}>  // @if ASYM
          ) outs(%w0 : tensor<${N}x${NG}x${G}xf32>) {
  ^bb0(%qv: ${QT}, %sv: ${ST},
       %zv: ${ST},  // @if ASYM
       %o: f32):
    %qf = arith.uitofp %qv : ${QT} to f32
    %sf = arith.extf %sv : f16 to f32  // @if !BF16
    %sb = arith.bitcast %sv : i16 to bf16  // @if BF16
    %sf = arith.extf %sb : bf16 to f32  // @if BF16
    %zf = arith.constant ${ZP} : f32  // @if !ASYM
    %zf = arith.extf %zv : f16 to f32  // @if ASYM && !BF16
    %zb = arith.bitcast %zv : i16 to bf16  // @if ASYM && BF16
    %zf = arith.extf %zb : bf16 to f32  // @if ASYM && BF16
    %c = arith.subf %qf, %zf : f32
    %r = arith.mulf %c, %sf : f32
    linalg.yield %r : f32
  } -> tensor<${N}x${NG}x${G}xf32>
  %wk = tensor.collapse_shape %w [[0], [1, 2]] : tensor<${N}x${NG}x${G}xf32> into tensor<${N}x${K}xf32>

  %y0 = tensor.empty(${DYN_M}) : tensor<${MX}x${N}xf32>
  %yz = linalg.fill ins(%zero : f32) outs(%y0 : tensor<${MX}x${N}xf32>) -> tensor<${MX}x${N}xf32>
  %y = linalg.matmul indexing_maps = [affine_map<(m, n, k) -> (m, k)>, affine_map<(m, n, k) -> (n, k)>,
                                      affine_map<(m, n, k) -> (m, n)>]
      ins(%x, %wk : tensor<${MX}x${K}xf32>, tensor<${N}x${K}xf32>) outs(%yz : tensor<${MX}x${N}xf32>) -> tensor<${MX}x${N}xf32>
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
