// Paged attention for decode (one query per sequence), split over the context (flash-decoding).
// Compile-time: HD (head dim, 16..256, HD/8 a power of two), GROUP (query heads per KV head).
// grid (nkv, B, NS), NTHREADS threads. Block (kvh, b, s) handles the GROUP query heads of KV head kvh
// over split s of sequence b's visible keys; TPT = HD/8 lanes share one key (8 dims each), so a block
// walks NSUB keys at a time. Keys visible to the query at position ctx-1: [max(0, ctx - window), ctx)
// (window 0: all). Split length = max(ceil(n / NS), min_split); splits past the end do nothing.
// NS == 1 writes out directly; otherwise partial sums go to part_acc / part_ml and paged_decode_combine
// finishes. Scores are kept in log2 units (q is pre-scaled by scale * log2(e)).
#ifndef HD
#define HD 128
#endif
#ifndef GROUP
#define GROUP 4
#endif
#define NTHREADS 128
#define TPT (HD / 8)
#define NSUB (NTHREADS / TPT)
#ifndef UNROLL
#define UNROLL (GROUP >= 8 ? 2 : 4)   // keys in flight per subgroup (register budget: GROUP x 16 accumulators)
#endif

__device__ __forceinline__ int split_length(int n, int ns, int min_split) {
  return max((n + ns - 1) / ns, min_split);
}

extern "C" __global__ void __launch_bounds__(NTHREADS)
paged_decode(const scalar_t* __restrict__ q, long long q_stride, const scalar_t* __restrict__ k_cache,
             const scalar_t* __restrict__ v_cache, const int* __restrict__ block_tables, int maxb,
             const int* __restrict__ context_lens, scalar_t* __restrict__ out, float* __restrict__ part_acc,
             float* __restrict__ part_ml, int nkv, int block_size, float scale_log2, int window, int min_split) {
  __shared__ float sm_acc[NSUB][GROUP][HD];
  __shared__ float sm_m[NSUB][GROUP], sm_l[NSUB][GROUP];
  pdl_start();
  const int kvh = blockIdx.x, b = blockIdx.y, split = blockIdx.z, ns = gridDim.z;
  const int nh = nkv * GROUP;
  const int tid = threadIdx.x, sub = tid / TPT, lane = tid % TPT;
  const int ctx = context_lens[b];
  const int lo = window > 0 ? max(0, ctx - window) : 0;
  const int split_len = split_length(ctx - lo, ns, min_split);
  const int start = lo + split * split_len;
  if (ns > 1 && start >= ctx) return;
  const int end = min(ctx, start + split_len);

  float qr[GROUP][8];
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    load8(q + b * q_stride + (long long)(kvh * GROUP + g) * HD + lane * 8, qr[g]);
#pragma unroll
    for (int e = 0; e < 8; ++e) qr[g][e] *= scale_log2;
  }
  float m[GROUP], l[GROUP], acc[GROUP][8];
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
  }
  const int* bt = block_tables + (long long)b * maxb;
  const long long tok_stride = (long long)nkv * HD;
  const long long head_off = (long long)kvh * HD + lane * 8;

  for (int base = start; base < end; base += NSUB * UNROLL) {
    // all UNROLL keys' slots first (independent block-table reads), then all their K/V loads in flight
    long long slot[UNROLL];
    bool ok[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int t = base + u * NSUB + sub;
      ok[u] = t < end;
      slot[u] = ok[u] ? (long long)bt[t / block_size] * block_size + t % block_size : 0;
    }
    raw8 kr[UNROLL], vr[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (ok[u]) {
        kr[u] = load_raw8(k_cache + slot[u] * tok_stride + head_off);
        vr[u] = load_raw8(v_cache + slot[u] * tok_stride + head_off);
      }
    }
    // the UNROLL keys' scores first, then one max / rescale per head for all of them
    float sc[UNROLL][GROUP];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float kf[8];
      unraw8(kr[u], kf);
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        float sv = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) sv += qr[g][e] * kf[e];
#pragma unroll
        for (int o = TPT / 2; o > 0; o >>= 1) sv += __shfl_xor_sync(0xffffffffu, sv, o);
        sc[u][g] = ok[u] ? sv : -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) mx = fmaxf(mx, sc[u][g]);
      if (mx == -INFINITY) continue;   // no visible key yet for this subgroup
      const float a = exp2f(m[g] - mx);
      float ps = 0.f;
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        sc[u][g] = exp2f(sc[u][g] - mx);   // masked keys: exp2(-inf) = 0
        ps += sc[u][g];
      }
      l[g] = l[g] * a + ps;
      m[g] = mx;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] *= a;
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (!ok[u]) continue;
      float vf[8];
      unraw8(vr[u], vf);
#pragma unroll
      for (int g = 0; g < GROUP; ++g)
        if (m[g] != -INFINITY) {
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[g][e] += sc[u][g] * vf[e];
        }
    }
  }
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
#pragma unroll
    for (int e = 0; e < 8; ++e) sm_acc[sub][g][lane * 8 + e] = acc[g][e];
    if (lane == 0) {
      sm_m[sub][g] = m[g];
      sm_l[sub][g] = l[g];
    }
  }
  __syncthreads();
  for (int idx = tid; idx < GROUP * HD; idx += NTHREADS) {
    const int g = idx / HD, d = idx - g * HD;
    float M = -INFINITY;
#pragma unroll 8
    for (int s = 0; s < NSUB; ++s) M = fmaxf(M, sm_m[s][g]);
    float L = 0.f, A = 0.f;
#pragma unroll 8
    for (int s = 0; s < NSUB; ++s) {
      const float w = sm_m[s][g] == -INFINITY ? 0.f : exp2f(sm_m[s][g] - M);
      L += sm_l[s][g] * w;
      A += sm_acc[s][g][d] * w;
    }
    const long long head = (long long)b * nh + kvh * GROUP + g;
    if (ns == 1) {
      out[head * HD + d] = from_f(A / L);
    } else {
      const long long ps = head * ns + split;
      part_acc[ps * HD + d] = A;
      if (d == 0) {
        part_ml[ps * 2] = M;
        part_ml[ps * 2 + 1] = L;
      }
    }
  }
}

// Merge the splits written by paged_decode: grid (nh, B), HD threads.
extern "C" __global__ void paged_decode_combine(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                                                const int* __restrict__ context_lens, scalar_t* __restrict__ out,
                                                int nh, int ns, int window, int min_split) {
  pdl_start();
  const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
  const int ctx = context_lens[b];
  const int lo = window > 0 ? max(0, ctx - window) : 0;
  const int n = ctx - lo;
  const int split_len = split_length(n, ns, min_split);
  const int used = min(ns, (n + split_len - 1) / split_len);
  const long long head = (long long)b * nh + h;
  const float* ml = part_ml + head * ns * 2;
  float M = -INFINITY;
  for (int s = 0; s < used; ++s) M = fmaxf(M, ml[2 * s]);
  float L = 0.f, A = 0.f;
  for (int s = 0; s < used; ++s) {
    const float w = exp2f(ml[2 * s] - M);
    L += ml[2 * s + 1] * w;
    A += part_acc[(head * ns + s) * HD + d] * w;
  }
  out[head * HD + d] = from_f(A / L);
}
