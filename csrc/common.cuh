// Device-side helpers shared by the resnet_fast CUDA kernels: float conversion, 16-byte packs, ReLU.
// Deliberately light (CUDA runtime + c10 Half/BFloat16 only): the .cu files never include ATen, so
// they compile in seconds; tensors, dispatch and launch sizing live in ops.cpp (see kernels.h).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#ifdef RESNET_FAST_CPU_EMULATION
#include "emulation/cpu_emulation.h"  // g++ build that runs the kernels on the CPU (tests only)
#else
#include <cuda_runtime.h>
// Kernel launch; KERNEL is a plain name (a function pointer for template kernels, whose template
// arguments would split the macro's arguments). The CPU emulation defines its own RF_LAUNCH.
#define RF_LAUNCH(KERNEL, GRID, BLOCK, STREAM, ...) KERNEL<<<GRID, BLOCK, 0, STREAM>>>(__VA_ARGS__)
#endif

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace resnet_fast {

// Calls f(std::integral_constant<int, V>{}, std::bool_constant<NHWC>{}) with V = VN for 16-byte packs or
// 1 for scalars, and the layout: one launch statement serves the four instantiations of an
// elementwise kernel template<typename T, int V, bool NHWC>.
template <int VN, typename F>
inline void with_pack_and_layout(bool vectorized, bool nhwc, F&& f) {
  if (nhwc) {
    if (vectorized) f(std::integral_constant<int, VN>{}, std::true_type{});
    else f(std::integral_constant<int, 1>{}, std::true_type{});
  } else {
    if (vectorized) f(std::integral_constant<int, VN>{}, std::false_type{});
    else f(std::integral_constant<int, 1>{}, std::false_type{});
  }
}

// All arithmetic is fp32; c10::Half / c10::BFloat16 convert with round-to-nearest-even.
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

// Pack<T, V>: V elements moved with one access of V * sizeof(T) bytes (aligned to that size).
// Pack<T, vec_elems<T>()> is the 16-byte pack (4 floats, 8 halves or bfloat16s). Callers check the
// 16-byte alignment of base pointers on the host and index in whole packs.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}
template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// Explicit instantiation of a launcher template for the three supported dtypes.
#define RF_INSTANTIATE_FOR_DTYPES(MACRO) \
  MACRO(float)                           \
  MACRO(c10::Half)                       \
  MACRO(c10::BFloat16)

}  // namespace resnet_fast
