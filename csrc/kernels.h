// Launchers of the resnet_fast CUDA kernels: raw pointers and a stream, no tensors. Implemented in
// add_relu.cu and batch_norm_act.cu (instantiated for float, c10::Half and c10::BFloat16), called by
// the tensor-level host code in ops.cpp, which checks every launch with C10_CUDA_KERNEL_LAUNCH_CHECK().
#pragma once

#ifdef RESNET_FAST_CPU_EMULATION
#include "emulation/cpu_emulation.h"
#else
#include <cuda_runtime_api.h>
#endif

#include <cstdint>

namespace resnet_fast {

// Elements per 16-byte pack.
template <typename T>
constexpr int vec_elems() {
  return static_cast<int>(16 / sizeof(T));
}

// ---- add_relu: out[i] = relu(x[i] + y[i]) for i < numel (flat, same strides for all three).
// vectorized: all three pointers 16-byte aligned (the last numel % vec_elems elements are scalar).
template <typename T>
void launch_add_relu(const T* x, const T* y, T* out, int64_t numel, bool vectorized, unsigned int blocks,
                     cudaStream_t stream);
constexpr int kAddReluThreads = 256;

// ---- batch_norm_act. Geometry of a [N, C, H, W] tensor processed as NHWC (offset m*C + c,
// m = n*HW + s) or NCHW (offset (n*C + c)*HW + s).
struct BnGeometry {
  int64_t N, C, HW, M;  // M = N * HW values per channel
  bool nhwc;
};

// Two-level reductions: NHWC blocks are kReduceCols channels x kReduceRows row lanes, grid
// (ceil(C / kReduceCols), P); NCHW blocks are kReduceThreads threads on one channel, grid (C, P).
// Each block writes one partial per channel: workspace [P, C].
constexpr int kReduceCols = 32;
constexpr int kReduceRows = 16;
constexpr int kReduceThreads = 256;
constexpr int kMaxPartials = 1024;
constexpr int kElementwiseThreads = 256;
constexpr int kChannelThreads = 256;

// Per-channel Welford partials (mean, M2, count) of x.
template <typename T>
void launch_bn_stats_partials(const T* x, const BnGeometry& g, int64_t P, float* p_mean, float* p_m2, float* p_n,
                              cudaStream_t stream);
// Merges the P partials into mean and biased var (M2 / M); M >= 1 (checked by the caller).
void launch_bn_stats_finalize(const float* p_mean, const float* p_m2, const float* p_n, int64_t P, int64_t C,
                              float* mean_out, float* var_out, cudaStream_t stream);
// out = relu?((x - mean) * invstd * weight + bias + residual); res, weight, bias may be nullptr.
// vectorized: 16-byte aligned pointers and packs that never cross a channel (NHWC: C % vec == 0;
// NCHW: HW % vec == 0).
template <typename T>
void launch_bn_apply(const T* x, const T* res, T* out, const BnGeometry& g, bool vectorized, const float* mean,
                     const float* invstd, const float* weight, const float* bias, bool relu, unsigned int blocks,
                     cudaStream_t stream);
// Per-channel partial sums of g and g * (x - mean), g = relu ? (out > 0 ? dy : 0) : dy.
template <typename T>
void launch_bn_bwd_reduce(const T* dy, const T* x, const T* out, const float* mean, const BnGeometry& g, int64_t P,
                          bool relu, float* p_sum_dy, float* p_sum_dy_xmu, cudaStream_t stream);
// grad_weight = sum_dy_xmu * invstd, grad_bias = sum_dy and the coefficients of
// grad_x = (g - a - (x - mean) * b) * c (a = b = 0 in eval mode).
void launch_bn_bwd_finalize(const float* p_sum_dy, const float* p_sum_dy_xmu, int64_t P, int64_t C, int64_t M,
                            bool training, const float* invstd, const float* weight, float* grad_weight,
                            float* grad_bias, float* coef_a, float* coef_b, float* coef_c, cudaStream_t stream);
// grad_x, and grad_res = g when grad_res != nullptr.
template <typename T>
void launch_bn_bwd_elemt(const T* dy, const T* x, const T* out, T* grad_x, T* grad_res, const BnGeometry& g,
                         bool vectorized, const float* mean, const float* coef_a, const float* coef_b,
                         const float* coef_c, bool relu, unsigned int blocks, cudaStream_t stream);

}  // namespace resnet_fast
