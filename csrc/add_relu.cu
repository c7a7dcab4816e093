// add_relu(x, y) = relu(x + y), elementwise, fp32 arithmetic.
//
// x and y with the same strides, contiguous or channels_last-contiguous, are processed as flat arrays
// of numel elements and the output gets the same strides. Otherwise both are copied to one memory format first (see pick_format).
// The main loop moves 16 bytes per access when all three pointers are 16-byte aligned; the last
// numel % N elements (and everything, for misaligned pointers) take the scalar loop.
#include "common.cuh"
#include "ops.h"

namespace resnet_fast {
namespace {

template <typename T>
__global__ void add_relu_kernel(const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ out,
                                int64_t numel, bool vectorized) {
  constexpr int N = Vec<T>::N;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t scalar_start = 0;
  if (vectorized) {
    const int64_t n_vec = numel / N;
    for (int64_t i = tid; i < n_vec; i += stride) {
      const Vec<T> a = load_vec(x + i * N);
      const Vec<T> b = load_vec(y + i * N);
      Vec<T> r;
#pragma unroll
      for (int k = 0; k < N; ++k) r.v[k] = from_float<T>(relu_f(to_float(a.v[k]) + to_float(b.v[k])));
      store_vec(out + i * N, r);
    }
    scalar_start = n_vec * N;
  }
  // Tail (fewer than N elements) or, for misaligned pointers, everything.
  for (int64_t i = scalar_start + tid; i < numel; i += stride) {
    out[i] = from_float<T>(relu_f(to_float(x[i]) + to_float(y[i])));
  }
}

}  // namespace

at::Tensor add_relu_cuda(const at::Tensor& x, const at::Tensor& y) {
  check_cuda(x, "add_relu", "x");
  check_cuda(y, "add_relu", "y");
  TORCH_CHECK(x.device() == y.device(), "add_relu: x and y must be on the same device");
  TORCH_CHECK(x.sizes() == y.sizes(), "add_relu: x and y must have the same shape, got ", x.sizes(), " and ",
              y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "add_relu: x and y must have the same dtype");
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), "add_relu: unsupported dtype ", x.scalar_type());
  c10::cuda::CUDAGuard guard(x.device());

  at::Tensor xc, yc, out;
  const bool dense = x.is_contiguous() || (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast));
  if (dense && x.strides() == y.strides()) {
    xc = x;
    yc = y;
    out = at::empty_like(x);  // dense input: same strides
  } else {
    const at::MemoryFormat fmt = pick_format(x);
    xc = in_format(x, fmt);
    yc = in_format(y, fmt);
    out = at::empty(x.sizes(), x.options().memory_format(fmt));
  }
  const int64_t numel = x.numel();
  if (numel == 0) return out;

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  RF_DISPATCH(x.scalar_type(), "add_relu", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* yp = yc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool vec = is_aligned16(xp) && is_aligned16(yp) && is_aligned16(op);
    const int64_t work = vec ? numel / Vec<scalar_t>::N + Vec<scalar_t>::N : numel;
    add_relu_kernel<scalar_t><<<grid_for(work, kThreads), kThreads, 0, stream>>>(xp, yp, op, numel, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace resnet_fast
