// sliding_window_attention: "sparse" attention for sliding-window layers (Gemma 2/3 local layers). The keys are a
// ring of WINDOW cache slots plus this step's keys, so work and bytes moved are O(WINDOW), never O(context).
//
// q [B, HQ, T, D] at positions qpos [T]; k, v [B, HKV, S, D] with kpos [S] the position each slot holds (-1 =
// empty) and valid [B, S] (1 = a real token, 0 = left padding). Query position p sees key position kp when
// p - WINDOW < kp <= p, kp >= 0 and the key is real (a query always sees itself, so padded rows stay finite).
// Optional Gemma 2 softcap as in attention.mlir. Output [B, HQ, T, D]. B, T, S are dynamic.
// Params: HQ HKV D SCALE WINDOW, SOFTCAP (0 = none).
func.func @main(%q: tensor<?x${HQ}x?x${D}xf32>, %k: tensor<?x${HKV}x?x${D}xf32>, %v: tensor<?x${HKV}x?x${D}xf32>,
                %kpos: tensor<?xi64>, %qpos: tensor<?xi64>, %valid: tensor<?x?xi8>) -> tensor<?x${HQ}x?x${D}xf32> {
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
      indexing_maps = [affine_map<(b, h, r, t, s) -> (b, h, r, t, s)>, affine_map<(b, h, r, t, s) -> (b, s)>,
                       affine_map<(b, h, r, t, s) -> (s)>, affine_map<(b, h, r, t, s) -> (t)>,
                       affine_map<(b, h, r, t, s) -> (b, h, r, t, s)>],
      iterator_types = ["parallel", "parallel", "parallel", "parallel", "parallel"]}
      ins(%sc, %valid, %kpos, %qpos : tensor<?x${HKV}x${R}x?x?xf32>, tensor<?x?xi8>, tensor<?xi64>, tensor<?xi64>)
      outs(%sm0 : tensor<?x${HKV}x${R}x?x?xf32>) {
  ^bb0(%x: f32, %real: i8, %kp: i64, %qp: i64, %o: f32):
    %scale = arith.constant ${SCALE} : f32
    %xs = arith.mulf %x, %scale : f32  // @if CAPPED
    %y = arith.mulf %x, %scale : f32  // @if !CAPPED
    %cap = arith.constant ${SOFTCAP} : f32  // @if CAPPED
    %xc = arith.divf %xs, %cap : f32  // @if CAPPED
    %th = math.tanh %xc : f32  // @if CAPPED
    %y = arith.mulf %th, %cap : f32  // @if CAPPED
    %w1 = arith.constant ${WINDOW_M1} : i64
    %z64 = arith.constant 0 : i64
    %causal = arith.cmpi sle, %kp, %qp : i64
    %wlo = arith.subi %qp, %w1 : i64
    %inwin = arith.cmpi sge, %kp, %wlo : i64
    %filled = arith.cmpi sge, %kp, %z64 : i64
    %z8 = arith.constant 0 : i8
    %isreal = arith.cmpi ne, %real, %z8 : i8
    %self = arith.cmpi eq, %kp, %qp : i64
    %seen = arith.ori %isreal, %self : i1
    %a0 = arith.andi %causal, %inwin : i1
    %a1 = arith.andi %a0, %filled : i1
    %keep = arith.andi %a1, %seen : i1
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
