// Skinny GEMM for decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M small (1..8, compile-time per kernel).
// Each warp owns ROWS consecutive output rows: its lanes stream those rows of W in 8-element (16-byte)
// vectors, ROWS * UNROLL loads in flight per lane (marked no-L1-allocate: W is read once), and dot them
// with the M rows of x (re-read from L1); fp32 accumulation. Needs K % 8 == 0 and 16-byte aligned rows.
// Warps walk the row groups grid-stride; the launch sizes the grid (to what the GPU holds at once: no
// wave tail of short blocks; or one row group per warp: the block scheduler balances), as tuned.
// WARPS * 32 threads per block.
// Before waiting for the previous kernel (PDL), each warp prefetches into L2 the weights of its first
// iteration: weights are never written by a kernel, so this overlaps the previous kernel's tail. The
// next kernel is let in (pdl_trigger) after this block's rows, not at its start.
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

// GLU false: y = x W^T (+ bias).  GLU true: W = [gate; up] (2N rows) and y[:, j] = silu(gate_j) * up_j,
// rows j and j + N streamed by one warp (the gate-up projection and SiLU-and-mul in one kernel).
template <int M, bool GLU>
__device__ __forceinline__ void gemv_body(const scalar_t* __restrict__ x, long long x_stride,
                                          const scalar_t* __restrict__ W, const scalar_t* __restrict__ bias,
                                          scalar_t* __restrict__ y, int N, int K) {
  constexpr int R = GLU ? 2 : ROWS;     // weight rows a warp streams at once
  constexpr int OUT = GLU ? 1 : ROWS;   // output columns they make
  const int lane = threadIdx.x & 31;
  const long long stride = (long long)gridDim.x * WARPS * OUT;
  const int K8 = K >> 3;
  const long long first = ((long long)blockIdx.x * WARPS + (threadIdx.x >> 5)) * OUT;  // this warp's first outputs
  // weight row of slot r for outputs starting at n0, and whether it exists
#define WROW(n0, r) (GLU ? (n0) + (long long)(r) * N : (n0) + (r))
#define WOK(n0, r) ((GLU ? (n0) : (n0) + (r)) < N)
  // PDL: the next kernel is let in only once this block has streamed its rows (pdl_trigger below, after the
  // loop), not at the start: its blocks would otherwise become resident and wait while this grid's later
  // blocks still need the SMs.
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int c = lane + u * 32;
      if (c < K8 && WOK(first, r)) asm volatile("prefetch.global.L2 [%0];" :: "l"(W + WROW(first, r) * K + c * 8));
    }
  pdl_wait();
  for (long long n0 = first; n0 < N; n0 += stride) {
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
    for (int base = lane; base < K8; base += 32 * UNROLL) {
      float wf[R][UNROLL][8];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          const int c = base + u * 32;
          if (c < K8 && WOK(n0, r)) load8_stream(W + WROW(n0, r) * K + c * 8, wf[r][u]);
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
            for (int r = 0; r < R; ++r)
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[r][m] += wf[r][u][e] * xf[e];
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m) acc[r][m] = warp_sum(acc[r][m]);
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < M; ++m) {
        if (GLU) {   // rounded as the plain gemv's output and then silu_mul would round: the same bits
          const float gate = rnd(acc[0][m] + (bias ? to_f(bias[n0]) : 0.f));
          const float up = rnd(acc[1][m] + (bias ? to_f(bias[n0 + N]) : 0.f));
          y[(long long)m * N + n0] = from_f(rnd(gate / (1.f + __expf(-gate))) * up);
        } else {
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const long long n = n0 + r;
            if (n < N) y[(long long)m * N + n] = from_f(acc[r][m] + (bias ? to_f(bias[n]) : 0.f));
          }
        }
      }
    }
  }
  pdl_trigger();
#undef WROW
#undef WOK
}

#define GEMV(MM, GLU, SUFFIX)                                                                            \
  extern "C" __global__ void __launch_bounds__(WARPS * 32)                                               \
      gemv_m##MM##SUFFIX(const scalar_t* __restrict__ x, long long x_stride, const scalar_t* __restrict__ W, \
                         const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, int N, int K) {    \
    gemv_body<MM, GLU>(x, x_stride, W, bias, y, N, K);                                                   \
  }
#define GEMV_BOTH(MM) GEMV(MM, false, ) GEMV(MM, true, _glu)
GEMV_BOTH(1)
GEMV_BOTH(2)
GEMV_BOTH(3)
GEMV_BOTH(4)
GEMV_BOTH(5)
GEMV_BOTH(6)
GEMV_BOTH(7)
GEMV_BOTH(8)
