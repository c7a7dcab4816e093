// Fused BatchNorm (+ residual) (+ ReLU) for [N, C, H, W] activations, NHWC (channels_last) first,
// NCHW supported. fp32 arithmetic and accumulation for every dtype.
//
// Forward, training:
//   1. stats: per-channel Welford (mean, M2, count) over M = N*H*W elements. Each block reduces a
//      slice of rows to one partial per channel ([P, C] workspace); a finalize kernel merges the P
//      partials with Chan's formula (numerically stable; never E[x^2] - E[x]^2), writes mean and
//      invstd = 1 / sqrt(var_biased + eps), and updates the running statistics exactly like
//      torch.nn.functional.batch_norm:  running = (1 - momentum) * running + momentum * batch,
//      with the unbiased variance M2 / (M - 1) for running_var.
//   2. apply: out = relu?((x - mean) * invstd * weight + bias + residual), one elementwise pass.
// Forward, eval: mean = running_mean, invstd = 1 / sqrt(running_var + eps), then the same apply.
//
// Backward (g = grad_out masked by out > 0 when relu):
//   sum_dy = sum(g), sum_dy_xmu = sum(g * (x - mean))            (same two-level reduction)
//   grad_weight = sum_dy_xmu * invstd, grad_bias = sum_dy, grad_residual = g
//   training: grad_x = (g - sum_dy / M - (x - mean) * invstd^2 * sum_dy_xmu / M) * invstd * weight
//   eval:     grad_x = g * invstd * weight
#include "common.cuh"
#include "ops.h"

namespace resnet_fast {
namespace {

// ---------------------------------------------------------------------------------------------
// Welford / Chan helpers.
__device__ __forceinline__ void welford_add(float& mean, float& m2, float& n, float v) {
  n += 1.f;
  const float d = v - mean;
  mean += d / n;
  m2 += d * (v - mean);
}

// Merge (mean_b, m2_b, n_b) into (mean, m2, n).
__device__ __forceinline__ void welford_merge(float& mean, float& m2, float& n, float mean_b, float m2_b,
                                              float n_b) {
  if (n_b == 0.f) return;
  const float nn = n + n_b;
  const float d = mean_b - mean;
  const float r = n_b / nn;
  mean += d * r;
  m2 += m2_b + d * d * n * r;
  n = nn;
}

// NHWC reductions: a block covers kCols consecutive channels (threadIdx.x, coalesced) and kRows row
// lanes (threadIdx.y); grid = (ceil(C / kCols), P), rows strided by P * kRows.
constexpr int kCols = 32;
constexpr int kRows = 16;
// NCHW reductions: a block of kThreads threads covers one channel (blockIdx.x) and a 1/P slice
// (blockIdx.y) of its N*HW elements, walked in (n, s) order so consecutive threads read consecutive s.
constexpr int kThreads = 256;  // power of two (tree reduction)
constexpr int kMaxPartials = 1024;

// ---------------------------------------------------------------------------------------------
// Statistics.
template <typename T>
__global__ void stats_nhwc_kernel(const T* __restrict__ x, int64_t M, int64_t C, float* __restrict__ p_mean,
                                  float* __restrict__ p_m2, float* __restrict__ p_n) {
  __shared__ float s_mean[kRows][kCols];
  __shared__ float s_m2[kRows][kCols];
  __shared__ float s_n[kRows][kCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCols + tx;
  float mean = 0.f, m2 = 0.f, n = 0.f;
  if (c < C) {
    const int64_t step = static_cast<int64_t>(gridDim.y) * kRows;
    for (int64_t m = static_cast<int64_t>(blockIdx.y) * kRows + ty; m < M; m += step) {
      welford_add(mean, m2, n, to_float(x[m * C + c]));
    }
  }
  s_mean[ty][tx] = mean;
  s_m2[ty][tx] = m2;
  s_n[ty][tx] = n;
  __syncthreads();
  if (ty == 0 && c < C) {
    for (int r = 1; r < kRows; ++r) welford_merge(mean, m2, n, s_mean[r][tx], s_m2[r][tx], s_n[r][tx]);
    const int64_t o = static_cast<int64_t>(blockIdx.y) * C + c;
    p_mean[o] = mean;
    p_m2[o] = m2;
    p_n[o] = n;
  }
}

template <typename T>
__global__ void stats_nchw_kernel(const T* __restrict__ x, int64_t N, int64_t C, int64_t HW,
                                  float* __restrict__ p_mean, float* __restrict__ p_m2, float* __restrict__ p_n) {
  __shared__ float s_mean[kThreads];
  __shared__ float s_m2[kThreads];
  __shared__ float s_n[kThreads];
  const int tid = threadIdx.x;
  const int64_t c = blockIdx.x;
  const int64_t M = N * HW;
  float mean = 0.f, m2 = 0.f, n = 0.f;
  const int64_t step = static_cast<int64_t>(gridDim.y) * kThreads;
  for (int64_t j = static_cast<int64_t>(blockIdx.y) * kThreads + tid; j < M; j += step) {
    const int64_t img = j / HW;
    const int64_t s = j - img * HW;
    welford_add(mean, m2, n, to_float(x[(img * C + c) * HW + s]));
  }
  s_mean[tid] = mean;
  s_m2[tid] = m2;
  s_n[tid] = n;
  __syncthreads();
  for (int off = kThreads / 2; off > 0; off >>= 1) {
    if (tid < off) {
      float a_mean = s_mean[tid], a_m2 = s_m2[tid], a_n = s_n[tid];
      welford_merge(a_mean, a_m2, a_n, s_mean[tid + off], s_m2[tid + off], s_n[tid + off]);
      s_mean[tid] = a_mean;
      s_m2[tid] = a_m2;
      s_n[tid] = a_n;
    }
    __syncthreads();
  }
  if (tid == 0) {
    const int64_t o = static_cast<int64_t>(blockIdx.y) * C + c;
    p_mean[o] = s_mean[0];
    p_m2[o] = s_m2[0];
    p_n[o] = s_n[0];
  }
}

// Merges the P partials of each channel. Optional outputs (nullptr = skip): invstd, biased var and the
// running statistics (updated in place).
__global__ void stats_finalize_kernel(const float* __restrict__ p_mean, const float* __restrict__ p_m2,
                                      const float* __restrict__ p_n, int64_t P, int64_t C, float eps,
                                      float momentum, float* __restrict__ mean_out, float* __restrict__ invstd_out,
                                      float* __restrict__ var_out, float* __restrict__ running_mean,
                                      float* __restrict__ running_var) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float mean = 0.f, m2 = 0.f, n = 0.f;
    for (int64_t p = 0; p < P; ++p) welford_merge(mean, m2, n, p_mean[p * C + c], p_m2[p * C + c], p_n[p * C + c]);
    const float var = m2 / n;  // n = M >= 1 (checked on the host)
    mean_out[c] = mean;
    if (invstd_out != nullptr) invstd_out[c] = 1.f / sqrtf(var + eps);
    if (var_out != nullptr) var_out[c] = var;
    if (running_mean != nullptr) running_mean[c] = momentum * mean + (1.f - momentum) * running_mean[c];
    if (running_var != nullptr) {
      const float unbiased = m2 / (n - 1.f);  // M > 1 when running stats are updated (checked on the host)
      running_var[c] = momentum * unbiased + (1.f - momentum) * running_var[c];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward reductions: per-channel sum(g) and sum(g * (x - mean)), g = relu ? (out > 0 ? dy : 0) : dy.
template <typename T>
__device__ __forceinline__ float masked_grad(const T* dy, const T* out, int64_t i, bool relu) {
  // torch's threshold_backward: grad where out > 0 (out <= 0 gives 0).
  return (relu && to_float(out[i]) <= 0.f) ? 0.f : to_float(dy[i]);
}

template <typename T>
__global__ void bwd_reduce_nhwc_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ out,
                                       const float* __restrict__ mean, int64_t M, int64_t C, bool relu,
                                       float* __restrict__ p_sum_dy, float* __restrict__ p_sum_dy_xmu) {
  __shared__ float s_dy[kRows][kCols];
  __shared__ float s_dyx[kRows][kCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCols + tx;
  float sum_dy = 0.f, sum_dyx = 0.f;
  if (c < C) {
    const float mu = mean[c];
    const int64_t step = static_cast<int64_t>(gridDim.y) * kRows;
    for (int64_t m = static_cast<int64_t>(blockIdx.y) * kRows + ty; m < M; m += step) {
      const int64_t i = m * C + c;
      const float g = masked_grad(dy, out, i, relu);
      sum_dy += g;
      sum_dyx += g * (to_float(x[i]) - mu);
    }
  }
  s_dy[ty][tx] = sum_dy;
  s_dyx[ty][tx] = sum_dyx;
  __syncthreads();
  if (ty == 0 && c < C) {
    for (int r = 1; r < kRows; ++r) {
      sum_dy += s_dy[r][tx];
      sum_dyx += s_dyx[r][tx];
    }
    const int64_t o = static_cast<int64_t>(blockIdx.y) * C + c;
    p_sum_dy[o] = sum_dy;
    p_sum_dy_xmu[o] = sum_dyx;
  }
}

template <typename T>
__global__ void bwd_reduce_nchw_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ out,
                                       const float* __restrict__ mean, int64_t N, int64_t C, int64_t HW, bool relu,
                                       float* __restrict__ p_sum_dy, float* __restrict__ p_sum_dy_xmu) {
  __shared__ float s_dy[kThreads];
  __shared__ float s_dyx[kThreads];
  const int tid = threadIdx.x;
  const int64_t c = blockIdx.x;
  const int64_t M = N * HW;
  const float mu = mean[c];
  float sum_dy = 0.f, sum_dyx = 0.f;
  const int64_t step = static_cast<int64_t>(gridDim.y) * kThreads;
  for (int64_t j = static_cast<int64_t>(blockIdx.y) * kThreads + tid; j < M; j += step) {
    const int64_t img = j / HW;
    const int64_t i = (img * C + c) * HW + (j - img * HW);
    const float g = masked_grad(dy, out, i, relu);
    sum_dy += g;
    sum_dyx += g * (to_float(x[i]) - mu);
  }
  s_dy[tid] = sum_dy;
  s_dyx[tid] = sum_dyx;
  __syncthreads();
  for (int off = kThreads / 2; off > 0; off >>= 1) {
    if (tid < off) {
      s_dy[tid] += s_dy[tid + off];
      s_dyx[tid] += s_dyx[tid + off];
    }
    __syncthreads();
  }
  if (tid == 0) {
    const int64_t o = static_cast<int64_t>(blockIdx.y) * C + c;
    p_sum_dy[o] = s_dy[0];
    p_sum_dy_xmu[o] = s_dyx[0];
  }
}

// Per-channel backward coefficients: grad_x = (g - coef_a - (x - mean) * coef_b) * coef_c.
__global__ void bwd_finalize_kernel(const float* __restrict__ p_sum_dy, const float* __restrict__ p_sum_dy_xmu,
                                    int64_t P, int64_t C, float inv_m, bool training,
                                    const float* __restrict__ invstd, const float* __restrict__ weight,
                                    float* __restrict__ grad_weight, float* __restrict__ grad_bias,
                                    float* __restrict__ coef_a, float* __restrict__ coef_b,
                                    float* __restrict__ coef_c) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum_dy = 0.f, sum_dyx = 0.f;
    for (int64_t p = 0; p < P; ++p) {
      sum_dy += p_sum_dy[p * C + c];
      sum_dyx += p_sum_dy_xmu[p * C + c];
    }
    const float inv = invstd[c];
    grad_weight[c] = sum_dyx * inv;
    grad_bias[c] = sum_dy;
    coef_a[c] = training ? sum_dy * inv_m : 0.f;
    coef_b[c] = training ? sum_dyx * inv_m * inv * inv : 0.f;
    coef_c[c] = inv * (weight != nullptr ? weight[c] : 1.f);
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise passes. V elements per access: V = Vec<T>::N when the pointers are 16-byte aligned and
// a pack never crosses a channel boundary (NHWC: C % V == 0, the V elements are channels c0..c0+V-1;
// NCHW: HW % V == 0, the V elements share channel c0); V = 1 otherwise. numel % V == 0 in both cases.
template <bool NHWC, int V>
__device__ __forceinline__ int64_t first_channel(int64_t base, int64_t C, int64_t HW) {
  return NHWC ? base % C : (base / HW) % C;
}

template <typename T, int V, bool NHWC>
__global__ void bn_apply_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ out,
                                int64_t numel, int64_t C, int64_t HW, const float* __restrict__ mean,
                                const float* __restrict__ invstd, const float* __restrict__ weight,
                                const float* __restrict__ bias, bool relu) {
  const int64_t n_packs = numel / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_packs; i += stride) {
    const int64_t base = i * V;
    const int64_t c0 = first_channel<NHWC, V>(base, C, HW);
    const Pack<T, V> xv = load_pack<T, V>(x + base);
    Pack<T, V> rv;
    if (res != nullptr) rv = load_pack<T, V>(res + base);
    Pack<T, V> ov;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t c = NHWC ? c0 + k : c0;
      float v = (to_float(xv.v[k]) - mean[c]) * invstd[c];
      if (weight != nullptr) v *= weight[c];
      if (bias != nullptr) v += bias[c];
      if (res != nullptr) v += to_float(rv.v[k]);
      if (relu) v = relu_f(v);
      ov.v[k] = from_float<T>(v);
    }
    store_pack<T, V>(out + base, ov);
  }
}

template <typename T, int V, bool NHWC>
__global__ void bn_bwd_elemt_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ out,
                                    T* __restrict__ grad_x, T* __restrict__ grad_res, int64_t numel, int64_t C,
                                    int64_t HW, const float* __restrict__ mean, const float* __restrict__ coef_a,
                                    const float* __restrict__ coef_b, const float* __restrict__ coef_c, bool relu) {
  const int64_t n_packs = numel / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_packs; i += stride) {
    const int64_t base = i * V;
    const int64_t c0 = first_channel<NHWC, V>(base, C, HW);
    const Pack<T, V> dv = load_pack<T, V>(dy + base);
    const Pack<T, V> xv = load_pack<T, V>(x + base);
    Pack<T, V> ov;
    if (relu) ov = load_pack<T, V>(out + base);
    Pack<T, V> gx, gr;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t c = NHWC ? c0 + k : c0;
      const bool pass = !relu || to_float(ov.v[k]) > 0.f;
      const float g = pass ? to_float(dv.v[k]) : 0.f;
      gr.v[k] = pass ? dv.v[k] : from_float<T>(0.f);
      gx.v[k] = from_float<T>((g - coef_a[c] - (to_float(xv.v[k]) - mean[c]) * coef_b[c]) * coef_c[c]);
    }
    store_pack<T, V>(grad_x + base, gx);
    if (grad_res != nullptr) store_pack<T, V>(grad_res + base, gr);
  }
}

// ---------------------------------------------------------------------------------------------
// Host helpers.
struct Geometry {
  int64_t N, C, HW, M;
  bool nhwc;
  at::MemoryFormat fmt;
};

Geometry geometry_of(const at::Tensor& x, at::MemoryFormat fmt) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.HW = x.size(2) * x.size(3);
  g.M = g.N * g.HW;
  g.fmt = fmt;
  g.nhwc = fmt == at::MemoryFormat::ChannelsLast;
  return g;
}

// Grid for the two-level reductions; returns P (partials per channel).
int64_t reduction_partials(const Geometry& g, dim3& grid, dim3& block) {
  const int64_t target_blocks = static_cast<int64_t>(sm_count()) * 4;
  int64_t P;
  if (g.nhwc) {
    const int64_t gx = (g.C + kCols - 1) / kCols;
    const int64_t max_p = std::max<int64_t>(1, std::min<int64_t>((g.M + kRows - 1) / kRows, kMaxPartials));
    P = std::min(max_p, std::max<int64_t>(1, (target_blocks + gx - 1) / gx));
    grid = dim3(static_cast<unsigned int>(gx), static_cast<unsigned int>(P));
    block = dim3(kCols, kRows);
  } else {
    const int64_t max_p = std::max<int64_t>(1, std::min<int64_t>((g.M + kThreads - 1) / kThreads, kMaxPartials));
    P = std::min(max_p, std::max<int64_t>(1, (target_blocks + g.C - 1) / g.C));
    grid = dim3(static_cast<unsigned int>(g.C), static_cast<unsigned int>(P));
    block = dim3(kThreads);
  }
  return P;
}

unsigned int channel_grid(int64_t C) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((C + 255) / 256, 65535)));
}

// Batch statistics of xc (contiguous in g.fmt) into float32 [C] outputs.
void launch_stats(const at::Tensor& xc, const Geometry& g, float eps, float momentum, float* mean_out,
                  float* invstd_out, float* var_out, float* running_mean, float* running_var) {
  TORCH_CHECK(g.C <= 2147483647LL, "batch_norm_act: too many channels");
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dim3 grid, block;
  const int64_t P = reduction_partials(g, grid, block);
  at::Tensor ws = at::empty({3, P, g.C}, xc.options().dtype(at::kFloat));
  float* p_mean = ws.mutable_data_ptr<float>();
  float* p_m2 = p_mean + P * g.C;
  float* p_n = p_m2 + P * g.C;
  RF_DISPATCH(xc.scalar_type(), "bn_stats", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    if (g.nhwc) {
      stats_nhwc_kernel<scalar_t><<<grid, block, 0, stream>>>(xp, g.M, g.C, p_mean, p_m2, p_n);
    } else {
      stats_nchw_kernel<scalar_t><<<grid, block, 0, stream>>>(xp, g.N, g.C, g.HW, p_mean, p_m2, p_n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  stats_finalize_kernel<<<channel_grid(g.C), 256, 0, stream>>>(p_mean, p_m2, p_n, P, g.C, eps, momentum, mean_out,
                                                                 invstd_out, var_out, running_mean, running_var);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether 16-byte packs can be used for tensors of geometry g at these addresses.
template <typename T>
bool can_vectorize(const Geometry& g, std::initializer_list<const void*> ptrs) {
  constexpr int N = Vec<T>::N;
  for (const void* p : ptrs) {
    if (p != nullptr && !is_aligned16(p)) return false;
  }
  return g.nhwc ? (g.C % N == 0) : (g.HW % N == 0);
}

template <typename T, int V, bool NHWC>
void launch_apply_v(const T* x, const T* res, T* out, const Geometry& g, const float* mean, const float* invstd,
                    const float* w, const float* b, bool relu, cudaStream_t stream) {
  const int64_t numel = g.M * g.C;
  bn_apply_kernel<T, V, NHWC><<<grid_for(numel / V, 256), 256, 0, stream>>>(x, res, out, numel, g.C, g.HW, mean,
                                                                             invstd, w, b, relu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int V, bool NHWC>
void launch_bwd_elemt_v(const T* dy, const T* x, const T* out, T* gx, T* gr, const Geometry& g, const float* mean,
                        const float* a, const float* b, const float* c, bool relu, cudaStream_t stream) {
  const int64_t numel = g.M * g.C;
  bn_bwd_elemt_kernel<T, V, NHWC><<<grid_for(numel / V, 256), 256, 0, stream>>>(dy, x, out, gx, gr, numel, g.C,
                                                                                 g.HW, mean, a, b, c, relu);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

// A per-channel parameter as a contiguous float32 [C] tensor (undefined if absent).
at::Tensor channel_param(const std::optional<at::Tensor>& t, int64_t C, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "batch_norm_act: ", name, " must have shape [", C, "], got ",
              t->sizes());
  return t->to(at::kFloat).contiguous();
}

void check_input(const at::Tensor& x, const char* op) {
  check_cuda(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D [N, C, H, W] tensor, got ", x.dim(), "-D");
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op, ": unsupported dtype ", x.scalar_type(),
              " (expected float32, float16 or bfloat16)");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& x) {
  check_input(x, "bn_stats");
  c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = pick_format(x);
  const at::Tensor xc = in_format(x, fmt);
  const Geometry g = geometry_of(xc, fmt);
  TORCH_CHECK(g.M > 0, "bn_stats: x has no elements per channel");
  at::Tensor mean = at::empty({g.C}, x.options().dtype(at::kFloat));
  at::Tensor var = at::empty({g.C}, x.options().dtype(at::kFloat));
  if (g.C == 0) return {mean, var};
  launch_stats(xc, g, 0.f, 0.f, mean.mutable_data_ptr<float>(), nullptr, var.mutable_data_ptr<float>(), nullptr,
               nullptr);
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    double momentum, double eps, const std::optional<at::Tensor>& residual, bool relu) {
  check_input(x, "bn_act_forward");
  c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = pick_format(x);
  const at::Tensor xc = in_format(x, fmt);
  const Geometry g = geometry_of(xc, fmt);
  const bool has_rm = running_mean.has_value() && running_mean->defined();
  const bool has_rv = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_rm == has_rv, "bn_act_forward: running_mean and running_var must both be given or both be None");
  TORCH_CHECK(training || has_rm, "bn_act_forward: training=False needs running_mean and running_var");

  const at::Tensor w = channel_param(weight, g.C, "weight");
  const at::Tensor b = channel_param(bias, g.C, "bias");
  at::Tensor rc;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                    residual->device() == x.device(),
                "bn_act_forward: residual must match x in shape, dtype and device");
    rc = in_format(*residual, fmt);
  }
  const auto fopt = x.options().dtype(at::kFloat);
  at::Tensor out = at::empty_like(xc);
  at::Tensor save_mean, save_invstd;

  if (training) {
    TORCH_CHECK(g.M > 1, "bn_act_forward: expected more than 1 value per channel when training, got input size ",
                x.sizes());
    save_mean = at::empty({g.C}, fopt);
    save_invstd = at::empty({g.C}, fopt);
    at::Tensor rm, rv;
    if (has_rm) {
      TORCH_CHECK(running_mean->numel() == g.C && running_var->numel() == g.C,
                  "bn_act_forward: running statistics must have ", g.C, " elements");
      TORCH_CHECK(running_mean->device() == x.device() && running_var->device() == x.device(),
                  "bn_act_forward: running statistics must be on x's device");
      // Kernels update float32 contiguous buffers; other dtypes/strides go through a copy written back.
      auto as_f32 = [](const at::Tensor& t) {
        return (t.scalar_type() == at::kFloat && t.is_contiguous()) ? t : t.to(at::kFloat).contiguous();
      };
      rm = as_f32(*running_mean);
      rv = as_f32(*running_var);
    }
    if (g.C > 0) {
      launch_stats(xc, g, static_cast<float>(eps), static_cast<float>(momentum), save_mean.mutable_data_ptr<float>(),
                   save_invstd.mutable_data_ptr<float>(), nullptr,
                   has_rm ? rm.mutable_data_ptr<float>() : nullptr, has_rm ? rv.mutable_data_ptr<float>() : nullptr);
    }
    if (has_rm) {
      if (!rm.is_same(*running_mean)) running_mean->copy_(rm);
      if (!rv.is_same(*running_var)) running_var->copy_(rv);
    }
  } else {
    save_mean = running_mean->to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
    save_invstd = running_var->to(at::kFloat).add(eps).sqrt().reciprocal().contiguous();
  }

  if (xc.numel() == 0) return {out, save_mean, save_invstd};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  RF_DISPATCH(x.scalar_type(), "bn_act_forward", [&] {
    using T = scalar_t;
    constexpr int VN = Vec<T>::N;
    const T* xp = xc.const_data_ptr<T>();
    const T* rp = rc.defined() ? rc.const_data_ptr<T>() : nullptr;
    T* op = out.mutable_data_ptr<T>();
    const float* mp = save_mean.const_data_ptr<float>();
    const float* ip = save_invstd.const_data_ptr<float>();
    const float* wp = ptr_or_null(w);
    const float* bp = ptr_or_null(b);
    const bool vec = can_vectorize<T>(g, {xp, rp, op});
    if (g.nhwc) {
      if (vec) launch_apply_v<T, VN, true>(xp, rp, op, g, mp, ip, wp, bp, relu, stream);
      else launch_apply_v<T, 1, true>(xp, rp, op, g, mp, ip, wp, bp, relu, stream);
    } else {
      if (vec) launch_apply_v<T, VN, false>(xp, rp, op, g, mp, ip, wp, bp, relu, stream);
      else launch_apply_v<T, 1, false>(xp, rp, op, g, mp, ip, wp, bp, relu, stream);
    }
  });
  return {out, save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, bool relu, bool residual_grad) {
  check_input(x, "bn_act_backward");
  check_cuda(grad_out, "bn_act_backward", "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes() && out.sizes() == x.sizes(),
              "bn_act_backward: grad_out and out must have x's shape");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
              "bn_act_backward: grad_out and out must have x's dtype");
  c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = pick_format(x);
  const at::Tensor xc = in_format(x, fmt);
  const at::Tensor dyc = in_format(grad_out, fmt);
  const at::Tensor outc = in_format(out, fmt);
  const Geometry g = geometry_of(xc, fmt);
  TORCH_CHECK(save_mean.numel() == g.C && save_invstd.numel() == g.C,
              "bn_act_backward: save_mean and save_invstd must have C elements");
  const at::Tensor mean = save_mean.to(at::kFloat).contiguous();
  const at::Tensor invstd = save_invstd.to(at::kFloat).contiguous();
  const at::Tensor w = channel_param(weight, g.C, "weight");

  const auto fopt = x.options().dtype(at::kFloat);
  at::Tensor grad_x = at::empty_like(xc);
  at::Tensor grad_res = residual_grad ? at::empty_like(xc) : at::empty({0}, x.options());
  at::Tensor grad_w = at::zeros({g.C}, fopt);
  at::Tensor grad_b = at::zeros({g.C}, fopt);
  if (xc.numel() == 0) return {grad_x, grad_w, grad_b, grad_res};

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dim3 grid, block;
  const int64_t P = reduction_partials(g, grid, block);
  at::Tensor ws = at::empty({2, P, g.C}, fopt);
  float* p_dy = ws.mutable_data_ptr<float>();
  float* p_dyx = p_dy + P * g.C;
  at::Tensor coef = at::empty({3, g.C}, fopt);
  float* ca = coef.mutable_data_ptr<float>();
  float* cb = ca + g.C;
  float* cc = cb + g.C;
  const float* mp = mean.const_data_ptr<float>();

  RF_DISPATCH(x.scalar_type(), "bn_act_backward", [&] {
    using T = scalar_t;
    constexpr int VN = Vec<T>::N;
    const T* dyp = dyc.const_data_ptr<T>();
    const T* xp = xc.const_data_ptr<T>();
    const T* op = outc.const_data_ptr<T>();
    if (g.nhwc) {
      bwd_reduce_nhwc_kernel<T><<<grid, block, 0, stream>>>(dyp, xp, op, mp, g.M, g.C, relu, p_dy, p_dyx);
    } else {
      bwd_reduce_nchw_kernel<T><<<grid, block, 0, stream>>>(dyp, xp, op, mp, g.N, g.C, g.HW, relu, p_dy, p_dyx);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bwd_finalize_kernel<<<channel_grid(g.C), 256, 0, stream>>>(
        p_dy, p_dyx, P, g.C, 1.f / static_cast<float>(g.M), training, invstd.const_data_ptr<float>(), ptr_or_null(w),
        grad_w.mutable_data_ptr<float>(), grad_b.mutable_data_ptr<float>(), ca, cb, cc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    T* gxp = grad_x.mutable_data_ptr<T>();
    T* grp = residual_grad ? grad_res.mutable_data_ptr<T>() : nullptr;
    const bool vec = can_vectorize<T>(g, {dyp, xp, op, gxp, grp});
    if (g.nhwc) {
      if (vec) launch_bwd_elemt_v<T, VN, true>(dyp, xp, op, gxp, grp, g, mp, ca, cb, cc, relu, stream);
      else launch_bwd_elemt_v<T, 1, true>(dyp, xp, op, gxp, grp, g, mp, ca, cb, cc, relu, stream);
    } else {
      if (vec) launch_bwd_elemt_v<T, VN, false>(dyp, xp, op, gxp, grp, g, mp, ca, cb, cc, relu, stream);
      else launch_bwd_elemt_v<T, 1, false>(dyp, xp, op, gxp, grp, g, mp, ca, cb, cc, relu, stream);
    }
  });
  return {grad_x, grad_w, grad_b, grad_res};
}

}  // namespace resnet_fast
