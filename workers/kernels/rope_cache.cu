// Rotary embedding ("rotate_half": halves x1, x2 -> x1 c - x2 s, x2 c + x1 s) applied in place to q and k,
// then k and v stored into the paged cache at slot_mapping[t] (slot < 0: padding, nothing stored).
// cos/sin are float32 [max_pos, hd/2]; they are rounded to the element type first, and each product
// and sum is rounded, as torch does in that type. grid (T, Y): the Y blocks of a token share its pairs.
// Token strides (in elements) let q/k/v be views into a fused qkv row; heads are contiguous inside.
extern "C" __global__ void rope_cache_write(scalar_t* __restrict__ q, scalar_t* __restrict__ k,
                                            const scalar_t* __restrict__ v, const long long* __restrict__ positions,
                                            const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                            scalar_t* __restrict__ k_cache, scalar_t* __restrict__ v_cache,
                                            const long long* __restrict__ slots, int nh, int nkv, int hd,
                                            long long q_stride, long long k_stride, long long v_stride) {
  pdl_start();
  const long long t = blockIdx.x;
  const int half = hd >> 1;
  const long long pos = positions[t];
  const long long slot = slots[t];
  const float* ct = cos_t + pos * half;
  const float* st = sin_t + pos * half;
  scalar_t* qt = q + t * q_stride;
  scalar_t* kt = k + t * k_stride;
  const scalar_t* vt = v + t * v_stride;
  const int pairs = (nh + nkv) * half;
  const int first = blockIdx.y * blockDim.x + threadIdx.x, step = gridDim.y * blockDim.x;
  for (int p = first; p < pairs; p += step) {
    const int h = p / half, i = p - h * half;
    const float c = rnd(ct[i]), s = rnd(st[i]);
    scalar_t* base = h < nh ? qt + h * hd : kt + (h - nh) * hd;
    const float x1 = to_f(base[i]), x2 = to_f(base[i + half]);
    const scalar_t y1 = from_f(rnd(x1 * c) - rnd(x2 * s));
    const scalar_t y2 = from_f(rnd(x2 * c) + rnd(x1 * s));
    base[i] = y1;
    base[i + half] = y2;
    if (h >= nh && slot >= 0) {
      scalar_t* kc = k_cache + (slot * nkv + (h - nh)) * hd;
      kc[i] = y1;
      kc[i + half] = y2;
    }
  }
  if (slot >= 0) {
    for (int e = first; e < nkv * hd; e += step) v_cache[slot * nkv * hd + e] = vt[e];
  }
}
