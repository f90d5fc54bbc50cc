// Paged attention for decode (one query per sequence), split over the context (flash-decoding).
// Compile-time: HD (head dim, 16..256, HD/8 a power of two), GROUP (query heads per KV head).
// grid (nkv, B, NS), NTHREADS threads. Block (kvh, b, s) handles the GROUP query heads of KV head kvh
// over split s of sequence b's visible keys; TPT = HD/8 lanes share one key (8 dims each), so a block
// walks NSUB keys at a time. Keys visible to the query at position ctx-1: [max(0, ctx - window), ctx)
// (window 0: all). Split length = max(ceil(n / NS), min_split); splits past the end do nothing.
// K and V reach shared memory in tiles of TK = NSUB x UNROLL keys through KV_STAGES cp.async stages
// (dynamic shared memory, KV_STAGES x 2 x TK x HD elements; the final merge reuses it): the next tiles'
// loads are in flight while this one is scored, and no K/V is held in registers.
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
#define UNROLL (GROUP >= 8 ? 2 : 4)   // keys per subgroup and tile (register budget: GROUP x UNROLL scores)
#endif
#ifndef KV_STAGES
#define KV_STAGES 3
#endif
#define TK (NSUB * UNROLL)                        // keys per tile
#define ROW_UNITS (HD * (int)sizeof(scalar_t) / 16)   // 16-byte units per key row of one head

__device__ __forceinline__ int split_length(int n, int ns, int min_split) {
  return max((n + ns - 1) / ns, min_split);
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

extern "C" __global__ void __launch_bounds__(NTHREADS)
paged_decode(const scalar_t* __restrict__ q, long long q_stride, const scalar_t* __restrict__ k_cache,
             const scalar_t* __restrict__ v_cache, const int* __restrict__ block_tables, int maxb,
             const int* __restrict__ context_lens, scalar_t* __restrict__ out, float* __restrict__ part_acc,
             float* __restrict__ part_ml, int nkv, int block_size, float scale_log2, int window, int min_split) {
  extern __shared__ __align__(16) unsigned char attn_smem[];
  scalar_t* kv_tiles = (scalar_t*)attn_smem;           // [KV_STAGES][2][TK][HD]
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
  const int ntiles = (end - start + TK - 1) / TK;
  const int* bt = block_tables + (long long)b * maxb;
  const long long tok_stride = (long long)nkv * HD;

  // tile `it` into stage it % KV_STAGES: K rows then V rows, 16 bytes per copy, keys past `end` skipped
  auto load_tile = [&](int it) {
    const int t0 = start + it * TK;
    scalar_t* dst = kv_tiles + (it % KV_STAGES) * 2 * TK * HD;
    for (int i = tid; i < 2 * TK * ROW_UNITS; i += NTHREADS) {
      const int kv = i / (TK * ROW_UNITS), rem = i - kv * (TK * ROW_UNITS);
      const int j = rem / ROW_UNITS, c = rem - j * ROW_UNITS, t = t0 + j;
      if (t < end) {
        const long long slot = (long long)bt[t / block_size] * block_size + t % block_size;
        const scalar_t* src = (kv ? v_cache : k_cache) + slot * tok_stride + (long long)kvh * HD;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                     :: "r"(smem_addr((unsigned char*)(dst + (kv * TK + j) * HD) + c * 16)),
                        "l"((const unsigned char*)src + c * 16) : "memory");
      }
    }
  };
#pragma unroll
  for (int s = 0; s < KV_STAGES - 1; ++s) {
    if (s < ntiles) load_tile(s);
    asm volatile("cp.async.commit_group;" ::: "memory");
  }

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

  for (int it = 0; it < ntiles; ++it) {
    asm volatile("cp.async.wait_group %0;" :: "n"(KV_STAGES - 2) : "memory");
    __syncthreads();   // tile it is in for every thread; the stage of tile it - 1 is free
    if (it + KV_STAGES - 1 < ntiles) load_tile(it + KV_STAGES - 1);
    asm volatile("cp.async.commit_group;" ::: "memory");
    const scalar_t* kt = kv_tiles + (it % KV_STAGES) * 2 * TK * HD;
    const scalar_t* vt = kt + TK * HD;
    const int base = start + it * TK;
    // the UNROLL keys' scores first, then one max / rescale per head for all of them
    float sc[UNROLL][GROUP];
    bool ok[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int j = u * NSUB + sub;
      ok[u] = base + j < end;
      float kf[8];
      load8_rw(kt + j * HD + lane * 8, kf);
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
      load8_rw(vt + (u * NSUB + sub) * HD + lane * 8, vf);
#pragma unroll
      for (int g = 0; g < GROUP; ++g)
        if (m[g] != -INFINITY) {
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[g][e] += sc[u][g] * vf[e];
        }
    }
  }
  asm volatile("cp.async.wait_group 0;" ::: "memory");
  __syncthreads();     // every thread is past its last tile: the stages become the merge buffer
  float (*sm_acc)[GROUP][HD] = (float (*)[GROUP][HD])attn_smem;   // [NSUB][GROUP][HD]
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
