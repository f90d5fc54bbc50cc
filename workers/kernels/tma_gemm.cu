// Decode-batch GEMM on Hopper's tensor-memory accelerator and warpgroup MMAs (sm_90a):
// y[M, N] = x[M, K] @ W[N, K]^T (+ bias), 16-bit in, fp32 accumulate, M <= MP (compile-time; rows of x
// past M are read as zeros and never written). Launch choices at run time: wg and stages.
// The weights are operand A (64 of their rows per consumer warpgroup, wg of them: bn = 64 * wg rows a
// block) and x is operand B (its MP rows are the MMA's N; past 64 they run as MP / 64 MMAs of 64), both
// K-major as stored. One producer warp streams `stages` stages of BK = 64 columns (one 128-byte line a row,
// 128-byte swizzled, the layout the MMAs read) with TMA copies that complete on an mbarrier per stage;
// the consumers release a stage on a second mbarrier once their MMAs have read it. The weights' first
// stages are requested before the PDL wait (no kernel writes weights), x's after it.
// With glu = I > 0, w is [gate; up] (2I rows) and y[M, I] = silu(x @ gate^T) * (x @ up^T), rounded as the
// GEMM followed by silu_mul rounds: a block's tile is bn / 2 gate rows and the same bn / 2 up rows.
// Split-K over the cluster (gridDim.y = cluster size S, portable up to 8): each block sums K / S columns,
// parks its fp32 tile in its own shared memory, and after a cluster barrier block r adds the S tiles'
// r-th part in rank order (the same bits on every run) through distributed shared memory and writes y.
#if DTYPE == 0
#error "tma_gemm takes 16-bit types only"
#endif
#ifndef MP
#define MP 64
#endif
#define BK 64
#define MAX_WG 2
#define NB (MP > 64 ? 64 : MP)    // N of one MMA
#define NSUB (MP / NB)            // MMAs a k-step, one per 64 rows of x
#define X_TILE (MP * BK * 2)      // bytes of a stage's x tile
#if DTYPE == 2
#define WG_AB "bf16"
#else
#define WG_AB "f16"
#endif

struct __align__(64) TensorMap { unsigned long long v[16]; };   // a CUtensorMap, passed by value

// A 2-D box of a tensor map (coordinates innermost first) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load(unsigned dst, const TensorMap* map, int c0, int c1, unsigned bar,
                                         unsigned long long policy) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
               " [%0], [%1, {%2, %3}], [%4], %5;"
               :: "r"(dst), "l"((unsigned long long)map), "r"(c0), "r"(c1), "r"(bar), "l"(policy) : "memory");
}
// wgmma shared-memory matrix descriptor: K-major rows of 128 bytes, 128-byte swizzle, 8-row groups 1 KB apart
__device__ __forceinline__ unsigned long long smem_desc(unsigned addr) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// keep the compiler from moving accumulator reads or writes across the asynchronous MMAs
template <int N>
__device__ __forceinline__ void fence_acc(float* d) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}

__device__ __forceinline__ void wgmma_n8(float* d, unsigned long long a, unsigned long long b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %6, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n8k16.f32." WG_AB "." WG_AB " {%0, %1, %2, %3}, %4, %5, p, 1, 1, 0, 0;\n}"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "l"(a), "l"(b), "r"(1));
}
__device__ __forceinline__ void wgmma_n16(float* d, unsigned long long a, unsigned long long b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n16k16.f32." WG_AB "." WG_AB " {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, 0, 0;\n}"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
               : "l"(a), "l"(b), "r"(1));
}
__device__ __forceinline__ void wgmma_n32(float* d, unsigned long long a, unsigned long long b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." WG_AB "." WG_AB " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
               : "l"(a), "l"(b), "r"(1));
}
__device__ __forceinline__ void wgmma_n64(float* d, unsigned long long a, unsigned long long b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." WG_AB "." WG_AB " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
               : "l"(a), "l"(b), "r"(1));
}

__device__ __forceinline__ void wgmma(float* d, unsigned long long a, unsigned long long b) {
#if NB == 8
  wgmma_n8(d, a, b);
#elif NB == 16
  wgmma_n16(d, a, b);
#elif NB == 32
  wgmma_n32(d, a, b);
#elif NB == 64
  wgmma_n64(d, a, b);
#else
#error "MP must be 8, 16, 32 or a multiple of 64"
#endif
}

// Weight rows [n0, n0 + bn) of a stage, or with glu = I, gate rows [n0, n0 + bn / 2) then up rows I + n0 ..
__device__ __forceinline__ void load_w(unsigned dst, const TensorMap* map, int k, int n0, int glu, int half,
                                       unsigned bar, unsigned long long policy) {
  if (glu) {
    tma_load(dst, map, k, n0, bar, policy);
    tma_load(dst + half * BK * 2, map, k, glu + n0, bar, policy);
  } else {
    tma_load(dst, map, k, n0, bar, policy);
  }
}

#define MAX_SPLITS 8   // cluster blocks along K (portable cluster size)

__device__ __forceinline__ float4 ld_cluster4(unsigned off, int rank) {   // 16 bytes of block `rank`'s shared memory
  unsigned remote;
  float4 r;
  asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(off), "r"(rank));
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(r.x), "=f"(r.y), "=f"(r.z), "=f"(r.w)
               : "r"(remote));
  return r;
}

// The sums over the cluster's blocks 0 .. n-1, in rank order, of 4 floats at shared address `off` (and, with
// `two`, at `off2`) in each: every block's values are requested before the first is added, so the remote
// loads are in flight together (one at a time, their latency added up over the blocks).
__device__ __forceinline__ void cluster_sum4(unsigned off, unsigned off2, bool two, int n, float* v, float* v2) {
  float4 a[MAX_SPLITS], b[MAX_SPLITS];
#pragma unroll
  for (int q = 0; q < MAX_SPLITS; ++q) {
    if (q < n) {
      a[q] = ld_cluster4(off, q);
      if (two) b[q] = ld_cluster4(off2, q);
    }
  }
  v[0] = v[1] = v[2] = v[3] = 0.f;
  v2[0] = v2[1] = v2[2] = v2[3] = 0.f;
#pragma unroll
  for (int q = 0; q < MAX_SPLITS; ++q) {
    if (q < n) {
      v[0] += a[q].x; v[1] += a[q].y; v[2] += a[q].z; v[3] += a[q].w;
      if (two) { v2[0] += b[q].x; v2[1] += b[q].y; v2[2] += b[q].z; v2[3] += b[q].w; }
    }
  }
}

__device__ __forceinline__ float tma_silu(float g) { return g / (1.f + __expf(-g)); }   // as silu_mul.cu

__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// Block: wg consumer warpgroups and one producer warp (wg * 128 + 32 threads); grid (N / bn, S), cluster (1, S).
extern "C" __global__ void __launch_bounds__(MAX_WG * 128 + 32, 1)
tma_gemm(const __grid_constant__ TensorMap w_map, const __grid_constant__ TensorMap x_map,
         const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, int M, int N, int k_tiles, int wg, int stages,
         int glu) {
  extern __shared__ __align__(1024) unsigned char tma_smem_raw[];
  // mbarriers full[stages] and empty[stages] first; then, 1 KB aligned, stage s's weight tile at
  // base + s * w_tile and its x tile at xbase + s * X_TILE
  const int bn = 64 * wg, w_tile = bn * BK * 2, rs = bn + 4;   // rs: fp32 row stride of the parked tile
  const int nthreads = wg * 128 + 32;
  const unsigned raw = smem_u32(tma_smem_raw), bars = raw;
  const unsigned base = (raw + 16u * stages + 1023u) & ~1023u;
  const unsigned xbase = base + stages * w_tile;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int half = bn / 2, cols = glu ? half : bn;   // output columns of this block's tile
  const int n0 = blockIdx.x * cols, split = blockIdx.y, nsplit = gridDim.y;
  const int kt0 = split * k_tiles / nsplit, k_iters = (split + 1) * k_tiles / nsplit - kt0, k0 = kt0 * BK;
  if (tid == wg * 128) {   // the producer's thread: fetch the tensor maps while the barriers are set up
    asm volatile("prefetch.tensormap [%0];" :: "l"((unsigned long long)&w_map) : "memory");
    asm volatile("prefetch.tensormap [%0];" :: "l"((unsigned long long)&x_map) : "memory");
  }
  if (tid == 0) {
    for (int s = 0; s < stages; ++s) {
      mbar_init(bars + 8 * s, 1);
      mbar_init(bars + 8 * (stages + s), wg * 4);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  float acc[NSUB][NB / 2];
  if (warp == wg * 4) {   // producer
    if (lane == 0) {
      const unsigned long long keep = l2_policy_evict_last(), stream = l2_policy_evict_first();
      const int first = k_iters < stages ? k_iters : stages;
      for (int it = 0; it < first; ++it) {
        mbar_expect_tx(bars + 8 * it, w_tile + X_TILE);
        load_w(base + it * w_tile, &w_map, k0 + it * BK, n0, glu, half, bars + 8 * it, stream);
      }
      pdl_wait();   // x is the previous kernel's output
      for (int it = 0; it < first; ++it)
        tma_load(xbase + it * X_TILE, &x_map, k0 + it * BK, 0, bars + 8 * it, keep);
      int s = 0;
      unsigned phase = 0;   // of the empty barrier of stage s: the round before this one
      for (int it = stages; it < k_iters; ++it) {
        mbar_wait(bars + 8 * (stages + s), phase);
        mbar_expect_tx(bars + 8 * s, w_tile + X_TILE);
        load_w(base + s * w_tile, &w_map, k0 + it * BK, n0, glu, half, bars + 8 * s, stream);
        tma_load(xbase + s * X_TILE, &x_map, k0 + it * BK, 0, bars + 8 * s, keep);
        if (++s == stages) { s = 0; phase ^= 1u; }
      }
    }
  } else {                 // consumer warpgroup g: weight rows n0 + 64 g ..
    const int g = warp >> 2;
#pragma unroll
    for (int j = 0; j < NSUB; ++j)
#pragma unroll
      for (int i = 0; i < NB / 2; ++i) acc[j][i] = 0.f;
    int s = 0;
    unsigned phase = 0;
    for (int it = 0; it < k_iters; ++it) {
      mbar_wait(bars + 8 * s, phase);
      const unsigned a = base + s * w_tile + g * (64 * BK * 2), b = xbase + s * X_TILE;
#pragma unroll
      for (int j = 0; j < NSUB; ++j) fence_acc<NB / 2>(acc[j]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk)
#pragma unroll
        for (int j = 0; j < NSUB; ++j)
          wgmma(acc[j], smem_desc(a + kk * 32), smem_desc(b + j * (64 * BK * 2) + kk * 32));
      wgmma_commit();
      wgmma_wait_all();
#pragma unroll
      for (int j = 0; j < NSUB; ++j) fence_acc<NB / 2>(acc[j]);
      if (lane == 0) mbar_arrive(bars + 8 * (stages + s));
      if (++s == stages) { s = 0; phase ^= 1u; }
    }
  }
  pdl_trigger();
  pdl_wait();      // (every thread: y may still be read by the previous kernel)
  __syncthreads(); // every stage has been read: the tiles' memory takes the fp32 tile [MP][rs]
  float* park = (float*)(tma_smem_raw + (base - raw));
  if (warp < wg * 4) {
    const int g = warp >> 2, r0 = g * 64 + (warp & 3) * 16 + (lane >> 2), c0 = (lane & 3) * 2;
#pragma unroll
    for (int j = 0; j < NSUB; ++j)
#pragma unroll
      for (int i = 0; i < NB / 2; ++i) {
        const int row = r0 + 8 * ((i >> 1) & 1), col = j * NB + 8 * (i >> 2) + c0 + (i & 1);
        park[col * rs + row] = acc[j][i];
      }
  }
  cluster_sync();
  // this block's share of the tile, 4 consecutive output columns a unit: units [u0, u1) of MP * cols / 4
  const int units = MP * (cols / 4), u0 = split * units / nsplit, u1 = (split + 1) * units / nsplit;
  const unsigned park_addr = smem_u32(park);
  for (int u = u0 + tid; u < u1; u += nthreads) {
    const int m = u / (cols / 4), n4 = (u % (cols / 4)) * 4, n = n0 + n4;
    if (m >= M || n >= N) continue;
    const unsigned off = park_addr + (unsigned)(m * rs + n4) * 4u;
    float v[4], up[4];
    cluster_sum4(off, off + half * 4u, glu != 0, nsplit, v, up);
    if (glu) {
#pragma unroll
      for (int e = 0; e < 4; ++e) v[e] = rnd(tma_silu(rnd(v[e]))) * rnd(up[e]);
    } else if (bias != nullptr) {
      for (int e = 0; e < 4; ++e) v[e] += to_f(bias[n + e]);
    }
    uint2 o;
    o.x = pack2(v[0], v[1]);
    o.y = pack2(v[2], v[3]);
    *(uint2*)(y + (long long)m * N + n) = o;
  }
  cluster_sync();  // no block leaves while another still reads its tile
}
