// Shared helpers for the resnet_fast CUDA kernels: dtype dispatch, float conversion, 16-byte vectors,
// layout selection and launch sizing. Light headers only (no ATen/cuda/CUDAContext.h, which pulls
// cusparse.h): see ../shared/TOOLCHAIN.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/core/MemoryFormat.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace resnet_fast {

// ---------------------------------------------------------------------------------------------
// dtype dispatch: float32, float16, bfloat16 (what the kernels are written and tested for).
// Usage: RF_DISPATCH(t.scalar_type(), "op", [&] { kernel<scalar_t><<<...>>>(...); });
#define RF_DISPATCH(TYPE, NAME, ...)                                                              \
  [&] {                                                                                           \
    switch (TYPE) {                                                                               \
      case at::ScalarType::Float: {                                                               \
        using scalar_t = float;                                                                   \
        return __VA_ARGS__();                                                                     \
      }                                                                                           \
      case at::ScalarType::Half: {                                                                \
        using scalar_t = c10::Half;                                                               \
        return __VA_ARGS__();                                                                     \
      }                                                                                           \
      case at::ScalarType::BFloat16: {                                                            \
        using scalar_t = c10::BFloat16;                                                           \
        return __VA_ARGS__();                                                                     \
      }                                                                                           \
      default:                                                                                    \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", TYPE, " (expected float32, float16 or bfloat16)"); \
    }                                                                                             \
  }()

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::ScalarType::Float || t == at::ScalarType::Half || t == at::ScalarType::BFloat16;
}

// ---------------------------------------------------------------------------------------------
// Conversions: all arithmetic is done in fp32; c10::Half / c10::BFloat16 convert with
// round-to-nearest-even on the device.
template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}

// relu that propagates NaN like torch.relu (a NaN input stays NaN).
__device__ __forceinline__ float relu_f(float v) { return v < 0.f ? 0.f : v; }

// ---------------------------------------------------------------------------------------------
// 16-byte vectors: Vec<T>::N elements loaded/stored with one 128-bit access. Callers must check
// 16-byte alignment of the base pointers (is_aligned16) and index in whole vectors.
constexpr int kVecBytes = 16;

// Pack<T, V>: V elements moved with one access of V * sizeof(T) bytes (aligned to that size).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  static constexpr int N = V;
  T v[V];
};

// Vec<T>: the 16-byte pack (4 floats, 8 halves or bfloat16s).
template <typename T>
using Vec = Pack<T, kVecBytes / static_cast<int>(sizeof(T))>;

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}
template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}
template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* p) {
  return load_pack<T, Vec<T>::N>(p);
}
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T>& v) {
  store_pack<T, Vec<T>::N>(p, v);
}

inline bool is_aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % kVecBytes == 0; }

// ---------------------------------------------------------------------------------------------
// Layouts. 4-D activations are processed either as NCHW (offset ((n*C + c)*HW + s)) or as NHWC
// (offset (m*C + c), m = n*HW + s). A tensor already contiguous in one of them is used as is
// (NCHW wins when both hold, e.g. C == 1 or H*W == 1, where the two orders coincide); anything
// else is copied, to channels_last when its strides look channels-last (stride(1) < stride(3)),
// else to NCHW. The Python fake implementations mirror this rule exactly.
inline at::MemoryFormat pick_format(const at::Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 4 && x.stride(1) < x.stride(3)) return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

// `t` as a tensor contiguous in `fmt` (no copy if it already is).
inline at::Tensor in_format(const at::Tensor& t, at::MemoryFormat fmt) {
  return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
}

// ---------------------------------------------------------------------------------------------
// Launch sizing.
inline int sm_count() {
  int dev = static_cast<int>(c10::cuda::current_device());
  static int cached[64] = {0};
  if (dev < 0 || dev >= 64) dev = 0;
  if (cached[dev] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    cached[dev] = std::max(n, 1);
  }
  return cached[dev];
}

// Blocks for a grid-stride loop over `work` items with `threads` per block: enough to fill the GPU
// a few times over, never more than there is work.
inline unsigned int grid_for(int64_t work, int threads) {
  const int64_t needed = (work + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sm_count()) * 8;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(needed, cap)));
}

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

}  // namespace resnet_fast
