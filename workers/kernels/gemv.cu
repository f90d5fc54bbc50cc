// Skinny GEMM for decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M small (1..8, compile-time per kernel).
// Each warp owns ROWS consecutive output rows: its lanes stream those rows of W in 8-element (16-byte)
// vectors, ROWS * UNROLL loads in flight per lane (marked no-L1-allocate: W is read once), and dot them
// with the M rows of x (re-read from L1); fp32 accumulation. Needs K % 8 == 0 and 16-byte aligned rows.
// Warps walk the row groups grid-stride; the launch sizes the grid (to what the GPU holds at once: no
// wave tail of short blocks; or one row group per warp: the block scheduler balances), as tuned.
// WARPS * 32 threads per block.
// Before waiting for the previous kernel (PDL), each warp prefetches into L2 the weights of its first
// iteration: weights are never written by a kernel, so this overlaps the previous kernel's tail.
#ifndef ROWS
#define ROWS 2
#endif
#define WARPS 4
#ifndef UNROLL
#define UNROLL (8 / ROWS)   // 16-byte loads in flight per lane and row
#endif

__device__ __forceinline__ void load8_stream(const scalar_t* p, float* f) {
#if DTYPE == 0
  load8(p, f);
#else
  uint4 u;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w) : "l"(p));
  unpack2(u.x, f[0], f[1]); unpack2(u.y, f[2], f[3]); unpack2(u.z, f[4], f[5]); unpack2(u.w, f[6], f[7]);
#endif
}

template <int M>
__device__ __forceinline__ void gemv_body(const scalar_t* __restrict__ x, long long x_stride,
                                          const scalar_t* __restrict__ W, const scalar_t* __restrict__ bias,
                                          scalar_t* __restrict__ y, int N, int K) {
  const int lane = threadIdx.x & 31;
  const long long stride = (long long)gridDim.x * WARPS * ROWS;
  const int K8 = K >> 3;
  const long long first = ((long long)blockIdx.x * WARPS + (threadIdx.x >> 5)) * ROWS;  // this warp's first rows
  pdl_trigger();
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int c = lane + u * 32;
      if (c < K8 && first + r < N) asm volatile("prefetch.global.L2 [%0];" :: "l"(W + (first + r) * K + c * 8));
    }
  pdl_wait();
  for (long long n0 = first; n0 < N; n0 += stride) {
    float acc[ROWS][M];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
    for (int base = lane; base < K8; base += 32 * UNROLL) {
      float wf[ROWS][UNROLL][8];
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          const int c = base + u * 32;
          if (c < K8 && n0 + r < N) load8_stream(W + (n0 + r) * K + c * 8, wf[r][u]);
        }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int c = base + u * 32;
        if (c < K8) {
#pragma unroll
          for (int m = 0; m < M; ++m) {
            float xf[8];
            load8(x + m * x_stride + c * 8, xf);
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[r][m] += wf[r][u][e] * xf[e];
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = warp_sum(acc[r][m]);
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const long long n = n0 + r;
        if (n < N) {
          const float bv = bias ? to_f(bias[n]) : 0.f;
#pragma unroll
          for (int m = 0; m < M; ++m) y[(long long)m * N + n] = from_f(acc[r][m] + bv);
        }
      }
    }
  }
}

#define GEMV(MM)                                                                                         \
  extern "C" __global__ void __launch_bounds__(WARPS * 32)                                               \
      gemv_m##MM(const scalar_t* __restrict__ x, long long x_stride, const scalar_t* __restrict__ W,    \
                 const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, int N, int K) {           \
    gemv_body<MM>(x, x_stride, W, bias, y, N, K);                                                        \
  }
GEMV(1)
GEMV(2)
GEMV(3)
GEMV(4)
GEMV(5)
GEMV(6)
GEMV(7)
GEMV(8)
