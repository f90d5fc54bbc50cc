// Decode GEMV for a few rows of x (M <= 4, compile-time MM) on sm_90, its weights streamed with bulk copies:
// y[M, N] = x[M, K] @ W[N, K]^T (+ bias), 16-bit in, fp32 accumulate.
// One block an SM (the launch sizes the grid); block b owns output rows [b N / G, (b + 1) N / G): their
// weights are one contiguous span of memory, which one producer thread streams in `chunk`-element pieces
// (a whole number of them a row) through a ring of `stages` shared-memory slots with 1-D bulk copies
// (cp.async.bulk) completing on an mbarrier per slot. The ring's first fill is requested before the PDL
// wait (no kernel writes weights), so a block that becomes resident while the kernel before it still runs
// (attention, a norm, the tail of the previous GEMV) streams its first stages meanwhile.
// CWARPS consumer warps take the stages round robin (stages a multiple of CWARPS: a warp owns its slots, so
// its parity waits are never two phases ahead): each dots its stage with x (copied into shared memory
// after the PDL wait) and parks one fp32 partial a row of x; the epilogue adds a row's partials in order.
// With glu = 1, W is [gate; up] (2N rows): the block streams its gate rows then the same up rows and writes
// silu(gate) * up, rounded as gemv's glu mode rounds.
#if DTYPE == 0
#error "stream_gemv takes 16-bit types only"
#endif
#ifndef MM
#define MM 1
#endif
#define CWARPS 8

__device__ __forceinline__ void bulk_load(unsigned dst, const void* src, unsigned bytes, unsigned bar,
                                          unsigned long long policy) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
               " [%0], [%1], %2, [%3], %4;"
               :: "r"(dst), "l"(src), "r"(bytes), "r"(bar), "l"(policy) : "memory");
}

__device__ __forceinline__ float dot8(uint4 w, uint4 x) {
  float a[8], b[8];
  unpack2(w.x, a[0], a[1]); unpack2(w.y, a[2], a[3]); unpack2(w.z, a[4], a[5]); unpack2(w.w, a[6], a[7]);
  unpack2(x.x, b[0], b[1]); unpack2(x.y, b[2], b[3]); unpack2(x.z, b[4], b[5]); unpack2(x.w, b[6], b[7]);
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) s += a[e] * b[e];
  return s;
}

// Shared memory: full[stages] and empty[stages] mbarriers, x [MM][K], the ring [stages][chunk], then the
// partials [stages this block][MM] (fp32).
extern "C" __global__ void __launch_bounds__(CWARPS * 32 + 32, 1)
stream_gemv(const scalar_t* __restrict__ x, long long x_stride, const scalar_t* __restrict__ W,
            const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, int N, int K, int chunk, int stages, int glu) {
  extern __shared__ __align__(128) unsigned char sg_smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int n_lo = (int)((long long)blockIdx.x * N / gridDim.x), n_hi = (int)((long long)(blockIdx.x + 1) * N / gridDim.x);
  const int per_row = K / chunk, span = (n_hi - n_lo) * per_row;   // stages a weight row; of one half
  const int total = glu ? 2 * span : span;
  const unsigned bars = smem_u32(sg_smem);
  scalar_t* xs = (scalar_t*)(sg_smem + ((16 * stages + 127) & ~127));
  scalar_t* ring = xs + MM * K;
  float* part = (float*)(ring + (long long)stages * chunk);
  const unsigned ring_addr = smem_u32(ring), bytes = (unsigned)chunk * 2u;
  if (tid == 0) {
    for (int s = 0; s < stages; ++s) {
      mbar_init(bars + 8 * s, 1);
      mbar_init(bars + 8 * (stages + s), 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == CWARPS) {   // producer
    if (lane == 0) {
      const unsigned long long policy = l2_policy_evict_first();
      const scalar_t* src0 = W + (long long)n_lo * K;              // gate (or the only) rows
      const scalar_t* src1 = W + (long long)(N + n_lo) * K;        // up rows (glu)
      for (int s = 0; s < total; ++s) {
        const int slot = s % stages, round = s / stages;
        if (round > 0) mbar_wait(bars + 8 * (stages + slot), (unsigned)(round - 1) & 1u);   // its last read
        const scalar_t* src = s < span ? src0 + (long long)s * chunk : src1 + (long long)(s - span) * chunk;
        mbar_expect_tx(bars + 8 * slot, bytes);
        bulk_load(ring_addr + slot * bytes, src, bytes, bars + 8 * slot, policy);
      }
      pdl_trigger();   // every weight requested: the next kernel may be scheduled
    }
    return;
  }

  pdl_wait();   // x is the previous kernel's output, and y may still be read by it
  const int K8 = K >> 3;
  for (int i = tid; i < MM * K8; i += CWARPS * 32) {
    const int m = i / K8, c = i - m * K8;
    *(uint4*)(xs + (long long)m * K + c * 8) = *(const uint4*)(x + m * x_stride + c * 8);
  }
  asm volatile("bar.sync 1, %0;" :: "n"(CWARPS * 32) : "memory");

  const int c8 = chunk >> 3;
  for (int s = warp; s < total; s += CWARPS) {
    const int slot = s % stages;
    mbar_wait(bars + 8 * slot, (unsigned)(s / stages) & 1u);
    const scalar_t* ws = ring + slot * chunk;
    const scalar_t* xc = xs + (s % per_row) * chunk;
    float acc[MM];
#pragma unroll
    for (int m = 0; m < MM; ++m) acc[m] = 0.f;
#pragma unroll 4
    for (int v = lane; v < c8; v += 32) {
      const uint4 wv = *(const uint4*)(ws + v * 8);
#pragma unroll
      for (int m = 0; m < MM; ++m) acc[m] += dot8(wv, *(const uint4*)(xc + (long long)m * K + v * 8));
    }
#pragma unroll
    for (int m = 0; m < MM; ++m) acc[m] = warp_sum(acc[m]);
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < MM; ++m) part[s * MM + m] = acc[m];
      mbar_arrive(bars + 8 * (stages + slot));   // (every lane's reads of the slot fed warp_sum above)
    }
  }
  asm volatile("bar.sync 1, %0;" :: "n"(CWARPS * 32) : "memory");

  const int rows = n_hi - n_lo;
  for (int i = tid; i < rows * MM; i += CWARPS * 32) {
    const int j = i / MM, m = i - j * MM, n = n_lo + j;
    float a = 0.f;
    for (int c = 0; c < per_row; ++c) a += part[(j * per_row + c) * MM + m];
    if (glu) {   // as gemv's glu mode: gate and up rounded like the plain GEMM's outputs, then silu_mul's rounding
      float u = 0.f;
      for (int c = 0; c < per_row; ++c) u += part[(span + j * per_row + c) * MM + m];
      const float gate = rnd(a + (bias ? to_f(bias[n]) : 0.f));
      const float up = rnd(u + (bias ? to_f(bias[n + N]) : 0.f));
      y[(long long)m * N + n] = from_f(rnd(gate / (1.f + __expf(-gate))) * up);
    } else {
      y[(long long)m * N + n] = from_f(a + (bias ? to_f(bias[n]) : 0.f));
    }
  }
}
