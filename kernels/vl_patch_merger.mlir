// vl_patch_merger: the Qwen2.5-VL multimodal projector (PatchMerger) that turns vision-tower tokens into LLM
// embeddings: RMSNorm (ln_q) over C features, each MERGE (= 2x2) consecutive tokens concatenated to C*MERGE,
// then Linear(C*MERGE, C*MERGE) -> GELU (erf) -> Linear(C*MERGE, DOUT), both with bias (float weights).
// x [T, C] with T a multiple of MERGE -> y [T / MERGE, DOUT]; T is dynamic. Params: C DOUT, MERGE, EPS.
func.func @main(%x: tensor<?x${C}xf32>, %lnw: tensor<${C}xf32>, %w1: tensor<${CM}x${CM}xf32>, %b1: tensor<${CM}xf32>,
                %w2: tensor<${DOUT}x${CM}xf32>, %b2: tensor<${DOUT}xf32>) -> tensor<?x${DOUT}xf32> {
  %c0 = arith.constant 0 : index
  %cmerge = arith.constant ${MERGE} : index
  %zero = arith.constant 0.0 : f32
  %t = tensor.dim %x, %c0 : tensor<?x${C}xf32>
  %tm = arith.divui %t, %cmerge : index

  %ss0 = tensor.empty(%t) : tensor<?xf32>
  %ssz = linalg.fill ins(%zero : f32) outs(%ss0 : tensor<?xf32>) -> tensor<?xf32>
  %ss = linalg.generic {indexing_maps = [affine_map<(t, c) -> (t, c)>, affine_map<(t, c) -> (t)>],
                        iterator_types = ["parallel", "reduction"]}
      ins(%x : tensor<?x${C}xf32>) outs(%ssz : tensor<?xf32>) {
  ^bb0(%xv: f32, %acc: f32):
    %sq = arith.mulf %xv, %xv : f32
    %r = arith.addf %acc, %sq : f32
    linalg.yield %r : f32
  } -> tensor<?xf32>
  %xn0 = tensor.empty(%t) : tensor<?x${C}xf32>
  %xn = linalg.generic {
      indexing_maps = [affine_map<(t, c) -> (t, c)>, affine_map<(t, c) -> (t)>, affine_map<(t, c) -> (c)>,
                       affine_map<(t, c) -> (t, c)>],
      iterator_types = ["parallel", "parallel"]}
      ins(%x, %ss, %lnw : tensor<?x${C}xf32>, tensor<?xf32>, tensor<${C}xf32>) outs(%xn0 : tensor<?x${C}xf32>) {
  ^bb0(%xv: f32, %sv: f32, %wv: f32, %o: f32):
    %n = arith.constant ${CF} : f32
    %eps = arith.constant ${EPS} : f32
    %mean = arith.divf %sv, %n : f32
    %me = arith.addf %mean, %eps : f32
    %inv = math.rsqrt %me : f32
    %a = arith.mulf %xv, %inv : f32
    %r = arith.mulf %a, %wv : f32
    linalg.yield %r : f32
  } -> tensor<?x${C}xf32>
  %x3 = tensor.expand_shape %xn [[0, 1], [2]] output_shape [%tm, ${MERGE}, ${C}] : tensor<?x${C}xf32> into tensor<?x${MERGE}x${C}xf32>
  %xm = tensor.collapse_shape %x3 [[0], [1, 2]] : tensor<?x${MERGE}x${C}xf32> into tensor<?x${CM}xf32>

  %h0 = tensor.empty(%tm) : tensor<?x${CM}xf32>
  %hz = linalg.fill ins(%zero : f32) outs(%h0 : tensor<?x${CM}xf32>) -> tensor<?x${CM}xf32>
  %h = linalg.matmul indexing_maps = [affine_map<(m, n, k) -> (m, k)>, affine_map<(m, n, k) -> (n, k)>,
                                      affine_map<(m, n, k) -> (m, n)>]
      ins(%xm, %w1 : tensor<?x${CM}xf32>, tensor<${CM}x${CM}xf32>) outs(%hz : tensor<?x${CM}xf32>) -> tensor<?x${CM}xf32>
  %ha0 = tensor.empty(%tm) : tensor<?x${CM}xf32>
  %ha = linalg.generic {
      indexing_maps = [affine_map<(m, n) -> (m, n)>, affine_map<(m, n) -> (n)>, affine_map<(m, n) -> (m, n)>],
      iterator_types = ["parallel", "parallel"]}
      ins(%h, %b1 : tensor<?x${CM}xf32>, tensor<${CM}xf32>) outs(%ha0 : tensor<?x${CM}xf32>) {
  ^bb0(%hv: f32, %bv: f32, %o: f32):
    %pre = arith.addf %hv, %bv : f32
    %half = arith.constant 0.5 : f32
    %one = arith.constant 1.0 : f32
    %rs2 = arith.constant 0.707106781 : f32
    %u = arith.mulf %pre, %rs2 : f32
    %e = math.erf %u : f32
    %onep = arith.addf %one, %e : f32
    %hp = arith.mulf %half, %pre : f32
    %r = arith.mulf %hp, %onep : f32
    linalg.yield %r : f32
  } -> tensor<?x${CM}xf32>

  %y0 = tensor.empty(%tm) : tensor<?x${DOUT}xf32>
  %yz = linalg.fill ins(%zero : f32) outs(%y0 : tensor<?x${DOUT}xf32>) -> tensor<?x${DOUT}xf32>
  %y = linalg.matmul indexing_maps = [affine_map<(m, n, k) -> (m, k)>, affine_map<(m, n, k) -> (n, k)>,
                                      affine_map<(m, n, k) -> (m, n)>]
      ins(%ha, %w2 : tensor<?x${CM}xf32>, tensor<${DOUT}x${CM}xf32>) outs(%yz : tensor<?x${DOUT}xf32>) -> tensor<?x${DOUT}xf32>
  %yb0 = tensor.empty(%tm) : tensor<?x${DOUT}xf32>
  %yb = linalg.generic {
      indexing_maps = [affine_map<(m, n) -> (m, n)>, affine_map<(m, n) -> (n)>, affine_map<(m, n) -> (m, n)>],
      iterator_types = ["parallel", "parallel"]}
      ins(%y, %b2 : tensor<?x${DOUT}xf32>, tensor<${DOUT}xf32>) outs(%yb0 : tensor<?x${DOUT}xf32>) {
  ^bb0(%yv: f32, %bv: f32, %o: f32):
    %r = arith.addf %yv, %bv : f32
    linalg.yield %r : f32
  } -> tensor<?x${DOUT}xf32>
  return %yb : tensor<?x${DOUT}xf32>
}
