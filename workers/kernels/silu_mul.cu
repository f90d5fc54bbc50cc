// silu(gate) * up for x = [gate | up] of shape [T, 2I] -> out [T, I].
// Rounds like torch: silu's result is stored in the element type before the product.
// grid (ceil(I / (8 * blockDim)), T) when vec, else (ceil(I / blockDim), T).
__device__ __forceinline__ float silu(float g) { return g / (1.f + __expf(-g)); }

extern "C" __global__ void silu_mul(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int I,
                                    long long x_stride, int vec) {
  pdl_start();
  const long long t = blockIdx.y;
  const scalar_t* g = x + t * x_stride;
  const scalar_t* u = g + I;
  scalar_t* o = out + t * (long long)I;
  if (vec) {
    const int i = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= I) return;
    float a[8], b[8];
    load8(g + i, a);
    load8(u + i, b);
#pragma unroll
    for (int j = 0; j < 8; ++j) a[j] = rnd(silu(a[j])) * b[j];
    store8(o + i, a);
  } else {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= I) return;
    o[i] = from_f(rnd(silu(to_f(g[i]))) * to_f(u[i]));
  }
}
