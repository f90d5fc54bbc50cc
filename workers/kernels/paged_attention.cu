// Paged attention for decode (one query per sequence), split over the context (flash-decoding).
// Compile-time: HD (head dim, 16..256, HD/8 a power of two), GROUP (query heads per KV head).
// grid (nkv, B, NS), NTHREADS threads. Block (kvh, b, s) handles the GROUP query heads of KV head kvh
// over split s of sequence b's visible keys; TPT = HD/8 lanes share one key (8 dims each), so a block
// walks NSUB keys at a time, UNROLL keys per subgroup in one batch. Keys visible to the query at position
// ctx-1: [max(0, ctx - window), ctx) (window 0: all). Split length = max(ceil(n / NS), min_split); splits
// past the end do nothing. Two kernels, chosen per batch size by the build's tuning:
// - paged_decode: each thread loads its keys' K/V rows into registers (all UNROLL keys' loads in flight);
// - paged_decode_staged: K and V reach shared memory in tiles of TK = NSUB x UNROLL keys through
//   KV_STAGES cp.async stages (dynamic shared memory, KV_STAGES x 2 x TK x HD elements), so the next
//   tiles' loads are in flight while one is scored.
// Both merge their subgroups through dynamic shared memory (NSUB x GROUP x HD floats; the staged kernel
// reuses its stages). NS == 1 writes out directly; otherwise partial sums go to part_acc / part_ml and
// paged_decode_combine finishes. Scores are kept in log2 units (q is pre-scaled by scale * log2(e)).
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
#define UNROLL (GROUP >= 8 ? 2 : 4)   // keys per subgroup and batch (register budget: GROUP x UNROLL scores)
#endif
#ifndef KV_STAGES
#define KV_STAGES 3
#endif
#define TK (NSUB * UNROLL)                            // keys per tile of the staged kernel
#define ROW_UNITS (HD * (int)sizeof(scalar_t) / 16)   // 16-byte units per key row of one head
// (TK x ROW_UNITS = 64 x UNROLL x sizeof(scalar_t): a multiple of NTHREADS, so each thread copies whole units)

__device__ __forceinline__ int split_length(int n, int ns, int min_split) {
  return max((n + ns - 1) / ns, min_split);
}

// What both kernels share: the block's keys, q (pre-scaled) and the running softmax state.
struct Split {
  int kvh, b, split, ns, sub, lane, start, end;
};

__device__ __forceinline__ bool block_split(const int* __restrict__ context_lens, int window, int min_split, Split& s) {
  s.kvh = blockIdx.x; s.b = blockIdx.y; s.split = blockIdx.z; s.ns = gridDim.z;
  s.sub = threadIdx.x / TPT; s.lane = threadIdx.x % TPT;
  const int ctx = context_lens[s.b];
  const int lo = window > 0 ? max(0, ctx - window) : 0;
  const int split_len = split_length(ctx - lo, s.ns, min_split);
  s.start = lo + s.split * split_len;
  s.end = min(ctx, s.start + split_len);
  return !(s.ns > 1 && s.start >= ctx);
}

struct State {
  float qr[GROUP][8], m[GROUP], l[GROUP], acc[GROUP][8];
};

__device__ __forceinline__ void init_state(State& st, const scalar_t* __restrict__ q, long long q_stride, const Split& s,
                                           float scale_log2) {
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    load8(q + s.b * q_stride + (long long)(s.kvh * GROUP + g) * HD + s.lane * 8, st.qr[g]);
#pragma unroll
    for (int e = 0; e < 8; ++e) st.qr[g][e] *= scale_log2;
    st.m[g] = -INFINITY;
    st.l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) st.acc[g][e] = 0.f;
  }
}

// One batch of UNROLL keys (ok[u]: key u is visible): their scores first, then one max / rescale per head
// for all of them, then the V rows. kload(u, f) / vload(u, f) give this lane's 8 dims of key u's K / V.
template <class KLoad, class VLoad>
__device__ __forceinline__ void attend(State& st, const bool (&ok)[UNROLL], KLoad kload, VLoad vload) {
  float sc[UNROLL][GROUP];
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    float kf[8];
    kload(u, kf);
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      float sv = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) sv += st.qr[g][e] * kf[e];
#pragma unroll
      for (int o = TPT / 2; o > 0; o >>= 1) sv += __shfl_xor_sync(0xffffffffu, sv, o);
      sc[u][g] = ok[u] ? sv : -INFINITY;
    }
  }
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    float mx = st.m[g];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) mx = fmaxf(mx, sc[u][g]);
    if (mx == -INFINITY) continue;   // no visible key yet for this subgroup
    const float a = exp2f(st.m[g] - mx);
    float ps = 0.f;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      sc[u][g] = exp2f(sc[u][g] - mx);   // masked keys: exp2(-inf) = 0
      ps += sc[u][g];
    }
    st.l[g] = st.l[g] * a + ps;
    st.m[g] = mx;
#pragma unroll
    for (int e = 0; e < 8; ++e) st.acc[g][e] *= a;
  }
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    if (!ok[u]) continue;
    float vf[8];
    vload(u, vf);
#pragma unroll
    for (int g = 0; g < GROUP; ++g)
      if (st.m[g] != -INFINITY) {
#pragma unroll
        for (int e = 0; e < 8; ++e) st.acc[g][e] += sc[u][g] * vf[e];
      }
  }
}

// Merge the subgroups' states (through smem_acc: NSUB x GROUP x HD floats, free for this use) and write
// the output, or this split's partial sums.
__device__ __forceinline__ void merge_store(const State& st, const Split& s, float* smem_acc, scalar_t* __restrict__ out,
                                            float* __restrict__ part_acc, float* __restrict__ part_ml, int nkv) {
  __shared__ float sm_m[NSUB][GROUP], sm_l[NSUB][GROUP];
  float (*sm_acc)[GROUP][HD] = (float (*)[GROUP][HD])smem_acc;
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
#pragma unroll
    for (int e = 0; e < 8; ++e) sm_acc[s.sub][g][s.lane * 8 + e] = st.acc[g][e];
    if (s.lane == 0) {
      sm_m[s.sub][g] = st.m[g];
      sm_l[s.sub][g] = st.l[g];
    }
  }
  __syncthreads();
  const int nh = nkv * GROUP;
  for (int idx = threadIdx.x; idx < GROUP * HD; idx += NTHREADS) {
    const int g = idx / HD, d = idx - g * HD;
    float M = -INFINITY;
#pragma unroll 8
    for (int j = 0; j < NSUB; ++j) M = fmaxf(M, sm_m[j][g]);
    float L = 0.f, A = 0.f;
#pragma unroll 8
    for (int j = 0; j < NSUB; ++j) {
      const float w = sm_m[j][g] == -INFINITY ? 0.f : exp2f(sm_m[j][g] - M);
      L += sm_l[j][g] * w;
      A += sm_acc[j][g][d] * w;
    }
    const long long head = (long long)s.b * nh + s.kvh * GROUP + g;
    if (s.ns == 1) {
      out[head * HD + d] = from_f(A / L);
    } else {
      const long long ps = head * s.ns + s.split;
      part_acc[ps * HD + d] = A;
      if (d == 0) {
        part_ml[ps * 2] = M;
        part_ml[ps * 2 + 1] = L;
      }
    }
  }
}

#define PAGED_DECODE_ARGS                                                                                   \
  const scalar_t *__restrict__ q, long long q_stride, const scalar_t *__restrict__ k_cache,                \
      const scalar_t *__restrict__ v_cache, const int *__restrict__ block_tables, int maxb,                \
      const int *__restrict__ context_lens, scalar_t *__restrict__ out, float *__restrict__ part_acc,      \
      float *__restrict__ part_ml, int nkv, int block_size, float scale_log2, int window, int min_split

extern "C" __global__ void __launch_bounds__(NTHREADS) paged_decode(PAGED_DECODE_ARGS) {
  extern __shared__ __align__(16) unsigned char attn_smem[];
  pdl_start();
  Split s;
  if (!block_split(context_lens, window, min_split, s)) return;
  State st;
  init_state(st, q, q_stride, s, scale_log2);
  const int* bt = block_tables + (long long)s.b * maxb;
  const long long tok_stride = (long long)nkv * HD;
  const long long head_off = (long long)s.kvh * HD + s.lane * 8;
  const int bs_shift = (block_size & (block_size - 1)) == 0 ? __ffs(block_size) - 1 : -1;
  for (int base = s.start; base < s.end; base += NSUB * UNROLL) {
    // all UNROLL keys' slots first (independent block-table reads), then all their K/V loads in flight
    long long slot[UNROLL];
    bool ok[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int t = base + u * NSUB + s.sub;
      ok[u] = t < s.end;
      slot[u] = !ok[u] ? 0 : bs_shift >= 0 ? ((long long)bt[t >> bs_shift] << bs_shift) + (t & (block_size - 1))
                                           : (long long)bt[t / block_size] * block_size + t % block_size;
    }
    raw8 kr[UNROLL], vr[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (ok[u]) {
        kr[u] = load_raw8(k_cache + slot[u] * tok_stride + head_off);
        vr[u] = load_raw8(v_cache + slot[u] * tok_stride + head_off);
      }
    }
    attend(st, ok, [&](int u, float* f) { unraw8(kr[u], f); }, [&](int u, float* f) { unraw8(vr[u], f); });
  }
  merge_store(st, s, (float*)attn_smem, out, part_acc, part_ml, nkv);
}

extern "C" __global__ void __launch_bounds__(NTHREADS) paged_decode_staged(PAGED_DECODE_ARGS) {
  extern __shared__ __align__(16) unsigned char attn_smem[];
  scalar_t* kv_tiles = (scalar_t*)attn_smem;           // [KV_STAGES][2][TK][HD]
  pdl_start();
  Split s;
  if (!block_split(context_lens, window, min_split, s)) return;
  const int ntiles = (s.end - s.start + TK - 1) / TK;
  const int* bt = block_tables + (long long)s.b * maxb;
  const long long tok_stride = (long long)nkv * HD;

  // tile `it` into stage it % KV_STAGES, 16 bytes per copy: this thread copies units c of keys j (the same
  // ones every tile), each key's K and V row after one block-table lookup; keys past `end` are skipped
  const int bs_shift = (block_size & (block_size - 1)) == 0 ? __ffs(block_size) - 1 : -1;
  auto load_tile = [&](int it) {
    const int t0 = s.start + it * TK;
    scalar_t* dst = kv_tiles + (it % KV_STAGES) * 2 * TK * HD;
#pragma unroll
    for (int r = 0; r < TK * ROW_UNITS / NTHREADS; ++r) {
      const int i = threadIdx.x + r * NTHREADS, j = i / ROW_UNITS, c = i % ROW_UNITS, t = t0 + j;
      if (t < s.end) {
        const long long slot = bs_shift >= 0 ? ((long long)bt[t >> bs_shift] << bs_shift) + (t & (block_size - 1))
                                             : (long long)bt[t / block_size] * block_size + t % block_size;
        const long long off = (slot * tok_stride + (long long)s.kvh * HD) * (long long)sizeof(scalar_t) + c * 16;
        const unsigned d = smem_u32(dst + j * HD) + c * 16;
        cp_async16(d, (const unsigned char*)k_cache + off);
        cp_async16(d + TK * HD * (unsigned)sizeof(scalar_t), (const unsigned char*)v_cache + off);
      }
    }
  };
#pragma unroll
  for (int k = 0; k < KV_STAGES - 1; ++k) {
    if (k < ntiles) load_tile(k);
    cp_commit();
  }
  State st;
  init_state(st, q, q_stride, s, scale_log2);
  for (int it = 0; it < ntiles; ++it) {
    cp_wait<KV_STAGES - 2>();
    __syncthreads();   // tile it is in for every thread; the stage of tile it - 1 is free
    if (it + KV_STAGES - 1 < ntiles) load_tile(it + KV_STAGES - 1);
    cp_commit();
    const scalar_t* kt = kv_tiles + (it % KV_STAGES) * 2 * TK * HD + s.lane * 8;
    const scalar_t* vt = kt + TK * HD;
    const int base = s.start + it * TK;
    bool ok[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) ok[u] = base + u * NSUB + s.sub < s.end;
    attend(st, ok, [&](int u, float* f) { load8_rw(kt + (u * NSUB + s.sub) * HD, f); },
           [&](int u, float* f) { load8_rw(vt + (u * NSUB + s.sub) * HD, f); });
  }
  cp_wait<0>();
  __syncthreads();     // every thread is past its last tile: the stages become the merge buffer
  merge_store(st, s, (float*)attn_smem, out, part_acc, part_ml, nkv);
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
