// Shared by every kernel family: the element type chosen by -DDTYPE (0 float32, 1 float16, 2 bfloat16)
// and float conversions written with PTX, so that no CUDA header is needed at NVRTC time.
// All arithmetic is done in float; storage is scalar_t.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#ifndef DTYPE
#define DTYPE 2
#endif

#if DTYPE == 0
typedef float scalar_t;
#else
typedef unsigned short scalar_t;
#endif

__device__ __forceinline__ float to_f(scalar_t x) {
#if DTYPE == 0
  return x;
#elif DTYPE == 1
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
  return f;
#else
  return __uint_as_float(((unsigned int)x) << 16);
#endif
}

__device__ __forceinline__ scalar_t from_f(float f) {
#if DTYPE == 0
  return f;
#elif DTYPE == 1
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#endif
}

// Round a float to the storage type and back (reproduces torch's per-op rounding).
__device__ __forceinline__ float rnd(float f) { return to_f(from_f(f)); }

#if DTYPE != 0
__device__ __forceinline__ void unpack2(unsigned int w, float& lo, float& hi) {
#if DTYPE == 2
  lo = __uint_as_float(w << 16);
  hi = __uint_as_float(w & 0xffff0000u);
#else
  lo = to_f((scalar_t)(w & 0xffffu));
  hi = to_f((scalar_t)(w >> 16));
#endif
}
__device__ __forceinline__ unsigned int pack2(float lo, float hi) {
  return ((unsigned int)from_f(hi) << 16) | (unsigned int)from_f(lo);
}
#endif

// 8 consecutive elements: one 16-byte access for 16-bit types, two for float32 (p aligned to that).
__device__ __forceinline__ void load8(const scalar_t* p, float* f) {
#if DTYPE == 0
  float4 a = __ldg((const float4*)p), b = __ldg((const float4*)p + 1);
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
#else
  uint4 u = __ldg((const uint4*)p);
  unpack2(u.x, f[0], f[1]); unpack2(u.y, f[2], f[3]); unpack2(u.z, f[4], f[5]); unpack2(u.w, f[6], f[7]);
#endif
}

// The same for memory that this kernel (or an earlier one in the graph) may write: plain loads.
__device__ __forceinline__ void load8_rw(const scalar_t* p, float* f) {
#if DTYPE == 0
  float4 a = *((const float4*)p), b = *((const float4*)p + 1);
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
#else
  uint4 u = *((const uint4*)p);
  unpack2(u.x, f[0], f[1]); unpack2(u.y, f[2], f[3]); unpack2(u.z, f[4], f[5]); unpack2(u.w, f[6], f[7]);
#endif
}

__device__ __forceinline__ void store8(scalar_t* p, const float* f) {
#if DTYPE == 0
  ((float4*)p)[0] = make_float4(f[0], f[1], f[2], f[3]);
  ((float4*)p)[1] = make_float4(f[4], f[5], f[6], f[7]);
#else
  uint4 u;
  u.x = pack2(f[0], f[1]); u.y = pack2(f[2], f[3]); u.z = pack2(f[4], f[5]); u.w = pack2(f[6], f[7]);
  *((uint4*)p) = u;
#endif
}

// 8 elements held raw in registers (loaded now, converted when used: fewer live registers in flight).
#if DTYPE == 0
struct raw8 { float4 a, b; };
__device__ __forceinline__ raw8 load_raw8(const scalar_t* p) {
  raw8 r;
  r.a = __ldg((const float4*)p);
  r.b = __ldg((const float4*)p + 1);
  return r;
}
__device__ __forceinline__ void unraw8(const raw8& r, float* f) {
  f[0] = r.a.x; f[1] = r.a.y; f[2] = r.a.z; f[3] = r.a.w; f[4] = r.b.x; f[5] = r.b.y; f[6] = r.b.z; f[7] = r.b.w;
}
#else
struct raw8 { uint4 a; };
__device__ __forceinline__ raw8 load_raw8(const scalar_t* p) {
  raw8 r;
  r.a = __ldg((const uint4*)p);
  return r;
}
__device__ __forceinline__ void unraw8(const raw8& r, float* f) {
  unpack2(r.a.x, f[0], f[1]); unpack2(r.a.y, f[2], f[3]); unpack2(r.a.z, f[4], f[5]); unpack2(r.a.w, f[6], f[7]);
}
#endif

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ __forceinline__ float block_sum(float v, float* smem32) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) smem32[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem32[lane] : 0.f;
  return warp_sum(v);
}

// Programmatic dependent launch (sm_90+; no-ops elsewhere and when launched without the attribute).
// Every kernel calls pdl_start() before it reads anything an earlier kernel wrote or writes anything:
// it lets the next kernel in the stream be scheduled now (its blocks park in their own pdl_wait until
// this grid has finished and its writes are visible), then waits for the previous grid likewise.
// Work on memory no kernel writes (weights) may go between pdl_trigger() and pdl_wait().
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_start() {
  pdl_trigger();
  pdl_wait();
}

// Shared memory and asynchronous copies into it (cp.async, sm_80+).
__device__ __forceinline__ unsigned smem_u32(const void* p) {   // the shared-window address of p
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src) {   // 16 bytes, L1 bypassed
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");
}
// The same, reading only src_bytes (0..16) of src and zero-filling the rest.
__device__ __forceinline__ void cp_async16_zfill(unsigned dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

// mbarriers (sm_90: transaction counts for bulk copies) and L2 eviction policies for copies into shared memory.
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  asm volatile("{\n.reg .pred p;\nLAB_WAIT:\n"
               "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
               "@!p bra LAB_WAIT;\n}" :: "r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ unsigned long long l2_policy_evict_first() {
  unsigned long long p;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
  return p;
}
__device__ __forceinline__ unsigned long long l2_policy_evict_last() {
  unsigned long long p;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(p));
  return p;
}

