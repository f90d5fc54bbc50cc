// Skinny GEMM for decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M small (1..MAXM, compile-time per kernel).
// One warp per output row n: the lanes stream W's row in 8-element (16-byte) vectors, UNROLL loads in
// flight per lane, and dot them with the M rows of x (re-read from L1/L2); fp32 accumulation.
// Needs K % 8 == 0 and 16-byte aligned rows. grid ceil(N / WARPS), WARPS*32 threads.
#define WARPS 4
#define UNROLL 4

template <int M>
__device__ __forceinline__ void gemv_body(const scalar_t* __restrict__ x, long long x_stride,
                                          const scalar_t* __restrict__ W, const scalar_t* __restrict__ bias,
                                          scalar_t* __restrict__ y, int N, int K) {
  const int lane = threadIdx.x & 31;
  const long long n = (long long)blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (n >= N) return;
  const scalar_t* w = W + n * K;
  const int K8 = K >> 3;
  float acc[M];
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = 0.f;
  for (int base = lane; base < K8; base += 32 * UNROLL) {
    float wf[UNROLL][8];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int c = base + u * 32;
      if (c < K8) load8(w + c * 8, wf[u]);
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
          for (int e = 0; e < 8; ++e) acc[m] += wf[u][e] * xf[e];
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
  if (lane == 0) {
    const float bv = bias ? to_f(bias[n]) : 0.f;
#pragma unroll
    for (int m = 0; m < M; ++m) y[(long long)m * N + n] = from_f(acc[m] + bv);
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
