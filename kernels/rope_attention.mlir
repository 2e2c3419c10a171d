// rope_attention: Qwen2.5 attention with RoPE fused: rotate this step's queries and keys, score them against the
// cached (already rotated) keys and against each other, softmax, weight the values; the rotated keys come back
// for the caller to append to its cache. Rotate-half RoPE on head pairs (d, d + D/2):
//   rot(x)[c, i] = x[c, i] * cos[c, i] + (c == 0 ? -x[1, i] : x[0, i]) * sin[c, i]   (x viewed as [2, D/2])
//
// q [B, T, HQ, D] and k [B, T, HKV, D] as the projections produce them (unrotated); cos, sin [B, T, D] from the
// host (any position scheme, M-RoPE included); kpast [B, HKV, P, D] the cached keys; v [B, HKV, P+T, D] every
// value, this step's last; mask [B, T, P+T] (1 = may attend: causality and padding). Outputs: out [B, T, HQ, D]
// (the layout o_proj reads) and krot [B, T, HKV, D]. B, T, P are dynamic. Params: HQ HKV D SCALE.
func.func @main(%q: tensor<?x?x${HQ}x${D}xf32>, %k: tensor<?x?x${HKV}x${D}xf32>, %cos: tensor<?x?x${D}xf32>,
                %sin: tensor<?x?x${D}xf32>, %kpast: tensor<?x${HKV}x?x${D}xf32>, %v: tensor<?x${HKV}x?x${D}xf32>,
                %mask: tensor<?x?x?xi8>) -> (tensor<?x?x${HQ}x${D}xf32>, tensor<?x?x${HKV}x${D}xf32>) {
  %c0 = arith.constant 0 : index
  %c1 = arith.constant 1 : index
  %c2 = arith.constant 2 : index
  %zero = arith.constant 0.0 : f32
  %b = tensor.dim %q, %c0 : tensor<?x?x${HQ}x${D}xf32>
  %t = tensor.dim %q, %c1 : tensor<?x?x${HQ}x${D}xf32>
  %np = tensor.dim %kpast, %c2 : tensor<?x${HKV}x?x${D}xf32>
  %s = arith.addi %np, %t : index
  %cs = tensor.expand_shape %cos [[0], [1], [2, 3]] output_shape [%b, %t, 2, ${HALF}] : tensor<?x?x${D}xf32> into tensor<?x?x2x${HALF}xf32>
  %sn = tensor.expand_shape %sin [[0], [1], [2, 3]] output_shape [%b, %t, 2, ${HALF}] : tensor<?x?x${D}xf32> into tensor<?x?x2x${HALF}xf32>
  %q2 = tensor.expand_shape %q [[0], [1], [2], [3, 4]] output_shape [%b, %t, ${HQ}, 2, ${HALF}] : tensor<?x?x${HQ}x${D}xf32> into tensor<?x?x${HQ}x2x${HALF}xf32>
  %k2 = tensor.expand_shape %k [[0], [1], [2], [3, 4]] output_shape [%b, %t, ${HKV}, 2, ${HALF}] : tensor<?x?x${HKV}x${D}xf32> into tensor<?x?x${HKV}x2x${HALF}xf32>

  %qr0 = tensor.empty(%b, %t) : tensor<?x?x${HQ}x2x${HALF}xf32>
  %qr2 = linalg.generic {
      indexing_maps = [affine_map<(b, t, h, c, i) -> (b, t, h, c, i)>, affine_map<(b, t, h, c, i) -> (b, t, h, 1 - c, i)>,
                       affine_map<(b, t, h, c, i) -> (b, t, c, i)>, affine_map<(b, t, h, c, i) -> (b, t, c, i)>,
                       affine_map<(b, t, h, c, i) -> (b, t, h, c, i)>],
      iterator_types = ["parallel", "parallel", "parallel", "parallel", "parallel"]}
      ins(%q2, %q2, %cs, %sn : tensor<?x?x${HQ}x2x${HALF}xf32>, tensor<?x?x${HQ}x2x${HALF}xf32>, tensor<?x?x2x${HALF}xf32>, tensor<?x?x2x${HALF}xf32>)
      outs(%qr0 : tensor<?x?x${HQ}x2x${HALF}xf32>) {
  ^bb0(%x: f32, %pair: f32, %cv: f32, %sv: f32, %o: f32):
    %ci = linalg.index 3 : index
    %first = arith.cmpi eq, %ci, %c0 : index
    %neg = arith.negf %pair : f32
    %other = arith.select %first, %neg, %pair : f32
    %a = arith.mulf %x, %cv : f32
    %bb = arith.mulf %other, %sv : f32
    %r = arith.addf %a, %bb : f32
    linalg.yield %r : f32
  } -> tensor<?x?x${HQ}x2x${HALF}xf32>
  %qr = tensor.collapse_shape %qr2 [[0], [1], [2], [3, 4]] : tensor<?x?x${HQ}x2x${HALF}xf32> into tensor<?x?x${HQ}x${D}xf32>

  %kr0 = tensor.empty(%b, %t) : tensor<?x?x${HKV}x2x${HALF}xf32>
  %kr2 = linalg.generic {
      indexing_maps = [affine_map<(b, t, h, c, i) -> (b, t, h, c, i)>, affine_map<(b, t, h, c, i) -> (b, t, h, 1 - c, i)>,
                       affine_map<(b, t, h, c, i) -> (b, t, c, i)>, affine_map<(b, t, h, c, i) -> (b, t, c, i)>,
                       affine_map<(b, t, h, c, i) -> (b, t, h, c, i)>],
      iterator_types = ["parallel", "parallel", "parallel", "parallel", "parallel"]}
      ins(%k2, %k2, %cs, %sn : tensor<?x?x${HKV}x2x${HALF}xf32>, tensor<?x?x${HKV}x2x${HALF}xf32>, tensor<?x?x2x${HALF}xf32>, tensor<?x?x2x${HALF}xf32>)
      outs(%kr0 : tensor<?x?x${HKV}x2x${HALF}xf32>) {
  ^bb0(%x: f32, %pair: f32, %cv: f32, %sv: f32, %o: f32):
    %ci = linalg.index 3 : index
    %first = arith.cmpi eq, %ci, %c0 : index
    %neg = arith.negf %pair : f32
    %other = arith.select %first, %neg, %pair : f32
    %a = arith.mulf %x, %cv : f32
    %bb = arith.mulf %other, %sv : f32
    %r = arith.addf %a, %bb : f32
    linalg.yield %r : f32
  } -> tensor<?x?x${HKV}x2x${HALF}xf32>
  %kr = tensor.collapse_shape %kr2 [[0], [1], [2], [3, 4]] : tensor<?x?x${HKV}x2x${HALF}xf32> into tensor<?x?x${HKV}x${D}xf32>

  // scores against the cache (slots 0 .. P-1) and against this step's keys (slots P .. P+T-1); query heads are
  // viewed as [HKV, R] so every index map stays affine
  %qg = tensor.expand_shape %qr [[0], [1], [2, 3], [4]] output_shape [%b, %t, ${HKV}, ${R}, ${D}] : tensor<?x?x${HQ}x${D}xf32> into tensor<?x?x${HKV}x${R}x${D}xf32>
  %sp0 = tensor.empty(%b, %t, %np) : tensor<?x${HKV}x${R}x?x?xf32>
  %spz = linalg.fill ins(%zero : f32) outs(%sp0 : tensor<?x${HKV}x${R}x?x?xf32>) -> tensor<?x${HKV}x${R}x?x?xf32>
  %sp = linalg.generic {
      indexing_maps = [affine_map<(b, h, r, t, p, d) -> (b, t, h, r, d)>, affine_map<(b, h, r, t, p, d) -> (b, h, p, d)>,
                       affine_map<(b, h, r, t, p, d) -> (b, h, r, t, p)>],
      iterator_types = ["parallel", "parallel", "parallel", "parallel", "parallel", "reduction"]}
      ins(%qg, %kpast : tensor<?x?x${HKV}x${R}x${D}xf32>, tensor<?x${HKV}x?x${D}xf32>) outs(%spz : tensor<?x${HKV}x${R}x?x?xf32>) {
  ^bb0(%qv: f32, %kv: f32, %acc: f32):
    %m = arith.mulf %qv, %kv : f32
    %r = arith.addf %acc, %m : f32
    linalg.yield %r : f32
  } -> tensor<?x${HKV}x${R}x?x?xf32>
  %sw0 = tensor.empty(%b, %t, %t) : tensor<?x${HKV}x${R}x?x?xf32>
  %swz = linalg.fill ins(%zero : f32) outs(%sw0 : tensor<?x${HKV}x${R}x?x?xf32>) -> tensor<?x${HKV}x${R}x?x?xf32>
  %sw = linalg.generic {
      indexing_maps = [affine_map<(b, h, r, t, u, d) -> (b, t, h, r, d)>, affine_map<(b, h, r, t, u, d) -> (b, u, h, d)>,
                       affine_map<(b, h, r, t, u, d) -> (b, h, r, t, u)>],
      iterator_types = ["parallel", "parallel", "parallel", "parallel", "parallel", "reduction"]}
      ins(%qg, %kr : tensor<?x?x${HKV}x${R}x${D}xf32>, tensor<?x?x${HKV}x${D}xf32>) outs(%swz : tensor<?x${HKV}x${R}x?x?xf32>) {
  ^bb0(%qv: f32, %kv: f32, %acc: f32):
    %m = arith.mulf %qv, %kv : f32
    %r = arith.addf %acc, %m : f32
    linalg.yield %r : f32
  } -> tensor<?x${HKV}x${R}x?x?xf32>
  %sa0 = tensor.empty(%b, %t, %s) : tensor<?x${HKV}x${R}x?x?xf32>
  %sa1 = tensor.insert_slice %sp into %sa0[0, 0, 0, 0, 0] [%b, ${HKV}, ${R}, %t, %np] [1, 1, 1, 1, 1] : tensor<?x${HKV}x${R}x?x?xf32> into tensor<?x${HKV}x${R}x?x?xf32>
  %sc = tensor.insert_slice %sw into %sa1[0, 0, 0, 0, %np] [%b, ${HKV}, ${R}, %t, %t] [1, 1, 1, 1, 1] : tensor<?x${HKV}x${R}x?x?xf32> into tensor<?x${HKV}x${R}x?x?xf32>

  %sm0 = tensor.empty(%b, %t, %s) : tensor<?x${HKV}x${R}x?x?xf32>
  %sm = linalg.generic {
      indexing_maps = [affine_map<(b, h, r, t, s) -> (b, h, r, t, s)>, affine_map<(b, h, r, t, s) -> (b, t, s)>,
                       affine_map<(b, h, r, t, s) -> (b, h, r, t, s)>],
      iterator_types = ["parallel", "parallel", "parallel", "parallel", "parallel"]}
      ins(%sc, %mask : tensor<?x${HKV}x${R}x?x?xf32>, tensor<?x?x?xi8>) outs(%sm0 : tensor<?x${HKV}x${R}x?x?xf32>) {
  ^bb0(%x: f32, %mv: i8, %o: f32):
    %scale = arith.constant ${SCALE} : f32
    %xs = arith.mulf %x, %scale : f32
    %z8 = arith.constant 0 : i8
    %keep = arith.cmpi ne, %mv, %z8 : i8
    %ninf = arith.constant 0xFF800000 : f32
    %r = arith.select %keep, %xs, %ninf : f32
    linalg.yield %r : f32
  } -> tensor<?x${HKV}x${R}x?x?xf32>
  %p0 = tensor.empty(%b, %t, %s) : tensor<?x${HKV}x${R}x?x?xf32>
  %p = linalg.softmax dimension(4) ins(%sm : tensor<?x${HKV}x${R}x?x?xf32>) outs(%p0 : tensor<?x${HKV}x${R}x?x?xf32>) -> tensor<?x${HKV}x${R}x?x?xf32>

  %o0 = tensor.empty(%b, %t) : tensor<?x?x${HKV}x${R}x${D}xf32>
  %oz = linalg.fill ins(%zero : f32) outs(%o0 : tensor<?x?x${HKV}x${R}x${D}xf32>) -> tensor<?x?x${HKV}x${R}x${D}xf32>
  %og = linalg.generic {
      indexing_maps = [affine_map<(b, t, h, r, d, s) -> (b, h, r, t, s)>, affine_map<(b, t, h, r, d, s) -> (b, h, s, d)>,
                       affine_map<(b, t, h, r, d, s) -> (b, t, h, r, d)>],
      iterator_types = ["parallel", "parallel", "parallel", "parallel", "parallel", "reduction"]}
      ins(%p, %v : tensor<?x${HKV}x${R}x?x?xf32>, tensor<?x${HKV}x?x${D}xf32>) outs(%oz : tensor<?x?x${HKV}x${R}x${D}xf32>) {
  ^bb0(%pv: f32, %vv: f32, %acc: f32):
    %m = arith.mulf %pv, %vv : f32
    %r = arith.addf %acc, %m : f32
    linalg.yield %r : f32
  } -> tensor<?x?x${HKV}x${R}x${D}xf32>
  %out = tensor.collapse_shape %og [[0], [1], [2, 3], [4]] : tensor<?x?x${HKV}x${R}x${D}xf32> into tensor<?x?x${HQ}x${D}xf32>
  return %out, %kr : tensor<?x?x${HQ}x${D}xf32>, tensor<?x?x${HKV}x${D}xf32>
}
