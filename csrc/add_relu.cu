// add_relu(x, y) = relu(x + y), elementwise, fp32 arithmetic (host side: add_relu_cuda in ops.cpp).
//
// The three tensors share one dense layout and are processed as flat arrays of numel elements. The
// main loop moves 16 bytes per access when all three pointers are 16-byte aligned; the last
// numel % N elements (and everything, for misaligned pointers) take the scalar loop.
#include "common.cuh"

namespace resnet_fast {
namespace {

template <typename T>
__global__ void add_relu_kernel(const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ out,
                                int64_t numel, bool vectorized) {
  constexpr int N = vec_elems<T>();
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t scalar_start = 0;
  if (vectorized) {
    const int64_t n_vec = numel / N;
    for (int64_t i = tid; i < n_vec; i += stride) {
      const Pack<T, N> a = load_pack<T, N>(x + i * N);
      const Pack<T, N> b = load_pack<T, N>(y + i * N);
      Pack<T, N> r;
#pragma unroll
      for (int k = 0; k < N; ++k) r.v[k] = from_float<T>(relu_f(to_float(a.v[k]) + to_float(b.v[k])));
      store_pack<T, N>(out + i * N, r);
    }
    scalar_start = n_vec * N;
  }
  // Tail (fewer than N elements) or, for misaligned pointers, everything.
  for (int64_t i = scalar_start + tid; i < numel; i += stride) {
    out[i] = from_float<T>(relu_f(to_float(x[i]) + to_float(y[i])));
  }
}

}  // namespace

template <typename T>
void launch_add_relu(const T* x, const T* y, T* out, int64_t numel, bool vectorized, unsigned int blocks,
                     cudaStream_t stream) {
  const auto kernel = &add_relu_kernel<T>;
  RF_LAUNCH(kernel, blocks, kAddReluThreads, stream, x, y, out, numel, vectorized);
}

#define RF_INSTANTIATE_ADD_RELU(T) \
  template void launch_add_relu<T>(const T*, const T*, T*, int64_t, bool, unsigned int, cudaStream_t);
RF_INSTANTIATE_FOR_DTYPES(RF_INSTANTIATE_ADD_RELU)

}  // namespace resnet_fast
