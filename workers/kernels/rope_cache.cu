// Rotary embedding ("rotate_half": halves x1, x2 -> x1 c - x2 s, x2 c + x1 s) applied in place to q and k,
// then k and v stored into the paged cache at slot_mapping[t] (slot < 0: padding, nothing stored).
// cos/sin are float32 [max_pos, hd/2]; they are rounded to the element type first, and each product
// and sum is rounded, as torch does in that type. grid (T, Y): the Y blocks of a token share its pairs.
// Token strides (in elements) let q/k/v be views into a fused qkv row; heads are contiguous inside.
#define ROPE_CACHE_PARAMS                                                                                   \
  scalar_t* __restrict__ q, scalar_t* __restrict__ k, const scalar_t* __restrict__ v,                         \
      const long long* __restrict__ positions, const float* __restrict__ cos_t, const float* __restrict__ sin_t, \
      scalar_t* __restrict__ k_cache, scalar_t* __restrict__ v_cache, const long long* __restrict__ slots,    \
      int nh, int nkv, int hd, long long q_stride, long long k_stride, long long v_stride

extern "C" __global__ void rope_cache_write(ROPE_CACHE_PARAMS) {
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

#if DTYPE != 0
// The same, 8 elements a thread (16-byte loads and stores; hd / 2 a multiple of 8, token strides and
// pointers 16-byte aligned): the same roundings, so the same bits.
extern "C" __global__ void rope_cache_write8(ROPE_CACHE_PARAMS) {
  pdl_start();
  const long long t = blockIdx.x;
  const int half = hd >> 1, groups = half >> 3;   // 8-element groups in each half of a head
  const long long pos = positions[t];
  const long long slot = slots[t];
  scalar_t* qt = q + t * q_stride;
  scalar_t* kt = k + t * k_stride;
  const scalar_t* vt = v + t * v_stride;
  const int units = (nh + nkv) * groups;
  const int first = blockIdx.y * blockDim.x + threadIdx.x, step = gridDim.y * blockDim.x;
  for (int u = first; u < units; u += step) {
    const int h = u / groups, i = (u - h * groups) * 8;
    const float4* cp = (const float4*)(cos_t + pos * half + i);
    const float4* sp = (const float4*)(sin_t + pos * half + i);
    const float4 c0 = cp[0], c1 = cp[1], s0 = sp[0], s1 = sp[1];
    const float c[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
    const float s[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
    scalar_t* base = h < nh ? qt + h * hd : kt + (h - nh) * hd;
    float x1[8], x2[8], y1[8], y2[8];
    load8_rw(base + i, x1);
    load8_rw(base + i + half, x2);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float cj = rnd(c[j]), sj = rnd(s[j]);
      y1[j] = rnd(x1[j] * cj) - rnd(x2[j] * sj);
      y2[j] = rnd(x2[j] * cj) + rnd(x1[j] * sj);
    }
    store8(base + i, y1);
    store8(base + i + half, y2);
    if (h >= nh && slot >= 0) {
      scalar_t* kc = k_cache + (slot * nkv + (h - nh)) * hd;
      store8(kc + i, y1);
      store8(kc + i + half, y2);
    }
  }
  if (slot >= 0) {
    for (int e = first * 8; e < nkv * hd; e += step * 8)
      *(uint4*)(v_cache + slot * nkv * hd + e) = *(const uint4*)(vt + e);
  }
}
#endif
