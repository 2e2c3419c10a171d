// attention: out = softmax(mask(softcap(scale * q.k))) . v over grouped-query heads (Gemma, Qwen decode/prefill).
//
// q [B, HQ, T, D]; k, v [B, HKV, S, D], query head h reading key/value head h / R (R = HQ / HKV: the heads are
// viewed as [HKV, R] so every index map stays affine, which llvm-cpu tiling needs for R = 5, 7);
// mask [B, T, S] (1 = may attend): the caller folds causality, sliding windows, ring-buffer slots and left
// padding into it, so this one kernel serves every layer kind. Gemma 2 (CAPPED) applies
// SOFTCAP * tanh(x / SOFTCAP) to the scaled scores before masking. Output [B, HQ, T, D]. B, T, S are dynamic.
// Params: HQ HKV D SCALE, SOFTCAP (0 = none).
func.func @main(%q: tensor<?x${HQ}x?x${D}xf32>, %k: tensor<?x${HKV}x?x${D}xf32>, %v: tensor<?x${HKV}x?x${D}xf32>,
                %mask: tensor<?x?x?xi8>) -> tensor<?x${HQ}x?x${D}xf32> {
  %c0 = arith.constant 0 : index
  %c2 = arith.constant 2 : index
  %zero = arith.constant 0.0 : f32
  %b = tensor.dim %q, %c0 : tensor<?x${HQ}x?x${D}xf32>
  %t = tensor.dim %q, %c2 : tensor<?x${HQ}x?x${D}xf32>
  %s = tensor.dim %k, %c2 : tensor<?x${HKV}x?x${D}xf32>
  %qg = tensor.expand_shape %q [[0], [1, 2], [3], [4]] output_shape [%b, ${HKV}, ${R}, %t, ${D}] : tensor<?x${HQ}x?x${D}xf32> into tensor<?x${HKV}x${R}x?x${D}xf32>

  %sc0 = tensor.empty(%b, %t, %s) : tensor<?x${HKV}x${R}x?x?xf32>
  %scz = linalg.fill ins(%zero : f32) outs(%sc0 : tensor<?x${HKV}x${R}x?x?xf32>) -> tensor<?x${HKV}x${R}x?x?xf32>
  %sc = linalg.generic {
      indexing_maps = [affine_map<(b, h, r, t, s, d) -> (b, h, r, t, d)>, affine_map<(b, h, r, t, s, d) -> (b, h, s, d)>,
                       affine_map<(b, h, r, t, s, d) -> (b, h, r, t, s)>],
      iterator_types = ["parallel", "parallel", "parallel", "parallel", "parallel", "reduction"]}
      ins(%qg, %k : tensor<?x${HKV}x${R}x?x${D}xf32>, tensor<?x${HKV}x?x${D}xf32>) outs(%scz : tensor<?x${HKV}x${R}x?x?xf32>) {
  ^bb0(%qv: f32, %kv: f32, %acc: f32):
    %m = arith.mulf %qv, %kv : f32
    %r = arith.addf %acc, %m : f32
    linalg.yield %r : f32
  } -> tensor<?x${HKV}x${R}x?x?xf32>

  %sm0 = tensor.empty(%b, %t, %s) : tensor<?x${HKV}x${R}x?x?xf32>
  %sm = linalg.generic {
      indexing_maps = [affine_map<(b, h, r, t, s) -> (b, h, r, t, s)>, affine_map<(b, h, r, t, s) -> (b, t, s)>,
                       affine_map<(b, h, r, t, s) -> (b, h, r, t, s)>],
      iterator_types = ["parallel", "parallel", "parallel", "parallel", "parallel"]}
      ins(%sc, %mask : tensor<?x${HKV}x${R}x?x?xf32>, tensor<?x?x?xi8>) outs(%sm0 : tensor<?x${HKV}x${R}x?x?xf32>) {
  ^bb0(%x: f32, %mv: i8, %o: f32):
    %scale = arith.constant ${SCALE} : f32
    %xs = arith.mulf %x, %scale : f32  // @if CAPPED
    %y = arith.mulf %x, %scale : f32  // @if !CAPPED
    %cap = arith.constant ${SOFTCAP} : f32  // @if CAPPED
    %xc = arith.divf %xs, %cap : f32  // @if CAPPED
    %th = math.tanh %xc : f32  // @if CAPPED
    %y = arith.mulf %th, %cap : f32  // @if CAPPED
    %z8 = arith.constant 0 : i8
    %keep = arith.cmpi ne, %mv, %z8 : i8
    %ninf = arith.constant 0xFF800000 : f32
    %r = arith.select %keep, %y, %ninf : f32
    linalg.yield %r : f32
  } -> tensor<?x${HKV}x${R}x?x?xf32>

  %p0 = tensor.empty(%b, %t, %s) : tensor<?x${HKV}x${R}x?x?xf32>
  %p = linalg.softmax dimension(4) ins(%sm : tensor<?x${HKV}x${R}x?x?xf32>) outs(%p0 : tensor<?x${HKV}x${R}x?x?xf32>) -> tensor<?x${HKV}x${R}x?x?xf32>

  %o0 = tensor.empty(%b, %t) : tensor<?x${HKV}x${R}x?x${D}xf32>
  %oz = linalg.fill ins(%zero : f32) outs(%o0 : tensor<?x${HKV}x${R}x?x${D}xf32>) -> tensor<?x${HKV}x${R}x?x${D}xf32>
  %og = linalg.generic {
      indexing_maps = [affine_map<(b, h, r, t, d, s) -> (b, h, r, t, s)>, affine_map<(b, h, r, t, d, s) -> (b, h, s, d)>,
                       affine_map<(b, h, r, t, d, s) -> (b, h, r, t, d)>],
      iterator_types = ["parallel", "parallel", "parallel", "parallel", "parallel", "reduction"]}
      ins(%p, %v : tensor<?x${HKV}x${R}x?x?xf32>, tensor<?x${HKV}x?x${D}xf32>) outs(%oz : tensor<?x${HKV}x${R}x?x${D}xf32>) {
  ^bb0(%pv: f32, %vv: f32, %acc: f32):
    %m = arith.mulf %pv, %vv : f32
    %r = arith.addf %acc, %m : f32
    linalg.yield %r : f32
  } -> tensor<?x${HKV}x${R}x?x${D}xf32>
  %out = tensor.collapse_shape %og [[0], [1, 2], [3], [4]] : tensor<?x${HKV}x${R}x?x${D}xf32> into tensor<?x${HQ}x?x${D}xf32>
  return %out : tensor<?x${HQ}x?x${D}xf32>
}
