// Skinny GEMM on the tensor cores for decode batches: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), 16-bit in,
// fp32 accumulate, M <= MP (compile-time, a multiple of 16; rows past M are zeros).
// Block: BN weight rows (BN / 16 warps of 16 rows each) against all MP rows of x; K streams through
// STAGES shared-memory stages of BK (64, 128 or 256) columns (cp.async, 16 bytes a copy, rows swizzled
// against bank conflicts; longer slices read longer runs of each weight row). mma.sync m16n8k16 makes the transposed tile C^T[n, m]: the weights are operand A and x
// operand B, both K-major as they are stored. Split-K over gridDim.y: each split writes its fp32 tile to
// `ws`, and the split that finishes last (a counter per tile, left at zero again) adds the splits in
// order (the same bits whichever finishes last) and writes y. Before the PDL wait, a block starts its
// first stages' weight copies (weights are never written by a kernel).
#if DTYPE == 0
#error "skinny_gemm takes 16-bit types only"
#endif
#ifndef BK
#define BK 64
#endif
#define CPR (BK / 8)   // 16-byte chunks per tile row
#ifndef MP
#define MP 64
#endif
#ifndef BN
#define BN 128
#endif
#ifndef STAGES
#define STAGES 4
#endif
#define NWARPS (BN / 16)
#define NT (MP / 8)   // n8 tiles (rows of x) per warp

// element offset of 16-byte chunk c of row r in a [rows][BK] tile, chunks XOR-swizzled by row (low 3 bits)
__device__ __forceinline__ int swz(int r, int c) { return r * BK + ((c ^ (r & 7)) << 3); }

__device__ __forceinline__ void ldsm_x4(unsigned* r, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
#if DTYPE == 2
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

extern "C" __global__ void __launch_bounds__(NWARPS * 32)
skinny_gemm(const scalar_t* __restrict__ x, long long x_stride, const scalar_t* __restrict__ W,
            const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, float* __restrict__ ws,
            unsigned* __restrict__ counters, int M, int N, int K, int k_per_split) {
  extern __shared__ __align__(128) unsigned char skinny_smem[];
  __shared__ int last;
  const unsigned sw = smem_u32(skinny_smem);                         // [STAGES][BN][BK]
  const unsigned sx = sw + STAGES * BN * BK * sizeof(scalar_t);      // [STAGES][MP][BK]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int n0 = blockIdx.x * BN, split = blockIdx.y, nsplit = gridDim.y;
  const int kb = split * k_per_split, ke = min(K, kb + k_per_split);
  const int ktiles = (ke - kb + BK - 1) / BK;

  auto load_w = [&](int kt) {
    const int k0 = kb + kt * BK, st = kt % STAGES;
    for (int i = tid; i < BN * CPR; i += NWARPS * 32) {
      const int r = i / CPR, c = i % CPR, n = n0 + r, k = k0 + c * 8;
      const bool ok = n < N && k < ke;
      cp_async16_zfill(sw + (st * BN * BK + swz(r, c)) * sizeof(scalar_t), ok ? W + (long long)n * K + k : W, ok ? 16 : 0);
    }
  };
  auto load_x = [&](int kt) {
    const int k0 = kb + kt * BK, st = kt % STAGES;
    for (int i = tid; i < MP * CPR; i += NWARPS * 32) {
      const int r = i / CPR, c = i % CPR, k = k0 + c * 8;
      const bool ok = r < M && k < ke;
      cp_async16_zfill(sx + (st * MP * BK + swz(r, c)) * sizeof(scalar_t), ok ? x + r * x_stride + k : x, ok ? 16 : 0);
    }
  };

  pdl_trigger();
  for (int s = 0; s < STAGES - 1; ++s)
    if (s < ktiles) load_w(s);
  pdl_wait();
  for (int s = 0; s < STAGES - 1; ++s) {   // group s holds x of stage s (group 0 also the early weights)
    if (s < ktiles) load_x(s);
    cp_commit();
  }

  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] = 0.f;

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_wait<STAGES - 2>();   // stage kt has landed (for this thread) ...
    __syncthreads();         // ... for every thread, and stage kt - 1 is free again
    const int nk = kt + STAGES - 1;
    if (nk < ktiles) {
      load_w(nk);
      load_x(nk);
    }
    cp_commit();
    const int st = kt % STAGES;
    const unsigned wb = sw + st * BN * BK * sizeof(scalar_t), xb = sx + st * MP * BK * sizeof(scalar_t);
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      unsigned a[4];
      ldsm_x4(a, wb + swz(warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, kk * 2 + (lane >> 4)) * sizeof(scalar_t));
#pragma unroll
      for (int j = 0; j < NT / 2; ++j) {
        unsigned b[4];
        ldsm_x4(b, xb + swz(j * 16 + (lane & 7) + ((lane >> 4) & 1) * 8, kk * 2 + ((lane >> 3) & 1)) * sizeof(scalar_t));
        mma16816(acc[2 * j], a, b[0], b[1]);
        mma16816(acc[2 * j + 1], a, b[2], b[3]);
      }
    }
  }
  cp_wait<0>();

  // acc[t][e]: weight row warp * 16 + lane / 4 (+ 8 for e >= 2), x row t * 8 + 2 * (lane % 4) + e % 2
  const int nl0 = warp * 16 + (lane >> 2), ml0 = 2 * (lane & 3);
  if (nsplit == 1) {
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int n = n0 + nl0 + (e >> 1) * 8, m = t * 8 + ml0 + (e & 1);
        if (n < N && m < M) y[(long long)m * N + n] = from_f(acc[t][e] + (bias ? to_f(bias[n]) : 0.f));
      }
    return;
  }
  float* tile = ws + ((long long)split * gridDim.x + blockIdx.x) * (BN * MP);   // [BN][MP] of this split
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) tile[(nl0 + (e >> 1) * 8) * MP + t * 8 + ml0 + (e & 1)] = acc[t][e];
  __threadfence();
  __syncthreads();
  if (tid == 0) last = atomicAdd(&counters[blockIdx.x], 1u) == (unsigned)(nsplit - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (tid == 0) counters[blockIdx.x] = 0u;
  const long long tile_stride = (long long)gridDim.x * (BN * MP);
  const float* base = ws + (long long)blockIdx.x * (BN * MP);
  for (int i = tid; i < BN * MP; i += NWARPS * 32) {
    const int nl = i / MP, m = i - nl * MP, n = n0 + nl;
    if (n >= N || m >= M) continue;
    float s = 0.f;
    for (int sp = 0; sp < nsplit; ++sp) {
      float v;
      asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(base + sp * tile_stride + i));
      s += v;
    }
    y[(long long)m * N + n] = from_f(s + (bias ? to_f(bias[n]) : 0.f));
  }
}
