// Fused BatchNorm (+ residual) (+ ReLU) for [N, C, H, W] activations, NHWC (channels_last) first,
// NCHW supported. fp32 arithmetic and accumulation for every dtype.
//
// Forward: statistics and normalisation are separate launches (ops bn_stats and bn_act), so that
// training and eval share one normalisation and the running-statistics update stays with the caller.
//   stats: per-channel Welford (mean, M2, count) over M = N*H*W elements. Each block reduces a slice
//      of rows to one partial per channel ([P, C] workspace), so that every SM has work even when C
//      is small; a finalize kernel merges the P partials with Chan's formula (numerically stable;
//      never E[x^2] - E[x]^2) into mean and biased var = M2 / M.
//   apply: out = relu?((x - mean) * invstd * weight + bias + residual), one elementwise pass, with
//      invstd = 1 / sqrt(var + eps) computed per channel by the host code.
//
// Backward (g = grad_out masked by out > 0 when relu):
//   sum_dy = sum(g), sum_dy_xmu = sum(g * (x - mean))            (same two-level reduction)
//   grad_weight = sum_dy_xmu * invstd, grad_bias = sum_dy, grad_residual = g
//   training: grad_x = (g - sum_dy / M - (x - mean) * invstd^2 * sum_dy_xmu / M) * invstd * weight
//             (mean and invstd are the batch's, which depend on x)
//   eval:     grad_x = g * invstd * weight
#include "common.cuh"

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
constexpr int kCols = kReduceCols;
constexpr int kRows = kReduceRows;
// NCHW reductions: a block of kThreads threads covers one channel (blockIdx.x) and a 1/P slice
// (blockIdx.y) of its N*HW elements, walked in (n, s) order so consecutive threads read consecutive s.
constexpr int kThreads = kReduceThreads;
static_assert((kThreads & (kThreads - 1)) == 0, "tree reduction needs a power of two");

// Reduction loops are unrolled kUnroll times (loads first, then the arithmetic in the same order as
// the plain loop) so that each thread keeps several loads in flight.
constexpr int kUnroll = 4;

// NCHW: walks j = j0, j0 + step, ... over the N*HW values of one channel as (image, spatial) pairs,
// without a division per element.
struct NchwCursor {
  int64_t img, s;
  const int64_t d_img, d_s, HW;
  __device__ NchwCursor(int64_t j0, int64_t step, int64_t hw)
      : img(j0 / hw), s(j0 % hw), d_img(step / hw), d_s(step % hw), HW(hw) {}
  __device__ __forceinline__ int64_t offset(int64_t C, int64_t c) const { return (img * C + c) * HW + s; }
  __device__ __forceinline__ void advance() {
    img += d_img;
    s += d_s;
    if (s >= HW) {
      s -= HW;
      ++img;
    }
  }
};

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
    int64_t m = static_cast<int64_t>(blockIdx.y) * kRows + ty;
    for (; m + (kUnroll - 1) * step < M; m += kUnroll * step) {
      float v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = to_float(x[(m + u * step) * C + c]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) welford_add(mean, m2, n, v[u]);
    }
    for (; m < M; m += step) welford_add(mean, m2, n, to_float(x[m * C + c]));
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
  int64_t j = static_cast<int64_t>(blockIdx.y) * kThreads + tid;
  NchwCursor cur(j, step, HW);
  for (; j + (kUnroll - 1) * step < M; j += kUnroll * step) {
    float v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      v[u] = to_float(x[cur.offset(C, c)]);
      cur.advance();
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) welford_add(mean, m2, n, v[u]);
  }
  for (; j < M; j += step) {
    welford_add(mean, m2, n, to_float(x[cur.offset(C, c)]));
    cur.advance();
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

// Merges the P partials of each channel.
__global__ void stats_finalize_kernel(const float* __restrict__ p_mean, const float* __restrict__ p_m2,
                                      const float* __restrict__ p_n, int64_t P, int64_t C,
                                      float* __restrict__ mean_out, float* __restrict__ var_out) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float mean = 0.f, m2 = 0.f, n = 0.f;
    for (int64_t p = 0; p < P; ++p) welford_merge(mean, m2, n, p_mean[p * C + c], p_m2[p * C + c], p_n[p * C + c]);
    mean_out[c] = mean;
    var_out[c] = m2 / n;  // n = M >= 1 (checked on the host)
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
    int64_t m = static_cast<int64_t>(blockIdx.y) * kRows + ty;
    for (; m + (kUnroll - 1) * step < M; m += kUnroll * step) {
      float g[kUnroll], xv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = (m + u * step) * C + c;
        g[u] = masked_grad(dy, out, i, relu);
        xv[u] = to_float(x[i]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        sum_dy += g[u];
        sum_dyx += g[u] * (xv[u] - mu);
      }
    }
    for (; m < M; m += step) {
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
  int64_t j = static_cast<int64_t>(blockIdx.y) * kThreads + tid;
  NchwCursor cur(j, step, HW);
  for (; j + (kUnroll - 1) * step < M; j += kUnroll * step) {
    float g[kUnroll], xv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = cur.offset(C, c);
      g[u] = masked_grad(dy, out, i, relu);
      xv[u] = to_float(x[i]);
      cur.advance();
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      sum_dy += g[u];
      sum_dyx += g[u] * (xv[u] - mu);
    }
  }
  for (; j < M; j += step) {
    const int64_t i = cur.offset(C, c);
    const float g = masked_grad(dy, out, i, relu);
    sum_dy += g;
    sum_dyx += g * (to_float(x[i]) - mu);
    cur.advance();
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
// Elementwise passes. V elements per access: V = vec_elems<T>() when the pointers are 16-byte aligned and
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
      const bool pass = !relu || !(to_float(ov.v[k]) <= 0.f);  // as masked_grad / threshold_backward
      const float g = pass ? to_float(dv.v[k]) : 0.f;
      gr.v[k] = pass ? dv.v[k] : from_float<T>(0.f);
      gx.v[k] = from_float<T>((g - coef_a[c] - (to_float(xv.v[k]) - mean[c]) * coef_b[c]) * coef_c[c]);
    }
    store_pack<T, V>(grad_x + base, gx);
    if (grad_res != nullptr) store_pack<T, V>(grad_res + base, gr);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers (grid sizing and tensor handling: ops.cpp).
template <typename T>
void launch_bn_stats_partials(const T* x, const BnGeometry& g, int64_t P, float* p_mean, float* p_m2, float* p_n,
                              cudaStream_t stream) {
  if (g.nhwc) {
    const dim3 grid(static_cast<unsigned int>((g.C + kCols - 1) / kCols), static_cast<unsigned int>(P));
    const auto kernel = &stats_nhwc_kernel<T>;
    RF_LAUNCH(kernel, grid, dim3(kCols, kRows), stream, x, g.M, g.C, p_mean, p_m2, p_n);
  } else {
    const dim3 grid(static_cast<unsigned int>(g.C), static_cast<unsigned int>(P));
    const auto kernel = &stats_nchw_kernel<T>;
    RF_LAUNCH(kernel, grid, kThreads, stream, x, g.N, g.C, g.HW, p_mean, p_m2, p_n);
  }
}

void launch_bn_stats_finalize(const float* p_mean, const float* p_m2, const float* p_n, int64_t P, int64_t C,
                              float* mean_out, float* var_out, cudaStream_t stream) {
  const unsigned int blocks = static_cast<unsigned int>((C + kChannelThreads - 1) / kChannelThreads);
  const auto kernel = &stats_finalize_kernel;
  RF_LAUNCH(kernel, blocks, kChannelThreads, stream, p_mean, p_m2, p_n, P, C, mean_out, var_out);
}

template <typename T>
void launch_bn_apply(const T* x, const T* res, T* out, const BnGeometry& g, bool vectorized, const float* mean,
                     const float* invstd, const float* weight, const float* bias, bool relu, unsigned int blocks,
                     cudaStream_t stream) {
  constexpr int VN = vec_elems<T>();
  const int64_t numel = g.M * g.C;
  const int64_t C = g.C, HW = g.HW;
  with_pack_and_layout<VN>(vectorized, g.nhwc, [&](auto pack, auto nhwc) {
    const auto kernel = &bn_apply_kernel<T, decltype(pack)::value, decltype(nhwc)::value>;
    RF_LAUNCH(kernel, blocks, kElementwiseThreads, stream, x, res, out, numel, C, HW, mean, invstd, weight, bias,
        relu);
  });
}

template <typename T>
void launch_bn_bwd_reduce(const T* dy, const T* x, const T* out, const float* mean, const BnGeometry& g, int64_t P,
                          bool relu, float* p_sum_dy, float* p_sum_dy_xmu, cudaStream_t stream) {
  if (g.nhwc) {
    const dim3 grid(static_cast<unsigned int>((g.C + kCols - 1) / kCols), static_cast<unsigned int>(P));
    const auto kernel = &bwd_reduce_nhwc_kernel<T>;
    RF_LAUNCH(kernel, grid, dim3(kCols, kRows), stream, dy, x, out, mean, g.M, g.C, relu, p_sum_dy, p_sum_dy_xmu);
  } else {
    const dim3 grid(static_cast<unsigned int>(g.C), static_cast<unsigned int>(P));
    const auto kernel = &bwd_reduce_nchw_kernel<T>;
    RF_LAUNCH(kernel, grid, kThreads, stream, dy, x, out, mean, g.N, g.C, g.HW, relu, p_sum_dy, p_sum_dy_xmu);
  }
}

void launch_bn_bwd_finalize(const float* p_sum_dy, const float* p_sum_dy_xmu, int64_t P, int64_t C, int64_t M,
                            bool training, const float* invstd, const float* weight, float* grad_weight,
                            float* grad_bias, float* coef_a, float* coef_b, float* coef_c, cudaStream_t stream) {
  const unsigned int blocks = static_cast<unsigned int>((C + kChannelThreads - 1) / kChannelThreads);
  const auto kernel = &bwd_finalize_kernel;
  RF_LAUNCH(kernel, blocks, kChannelThreads, stream, p_sum_dy, p_sum_dy_xmu, P, C, 1.f / static_cast<float>(M),
      training, invstd, weight, grad_weight, grad_bias, coef_a, coef_b, coef_c);
}

template <typename T>
void launch_bn_bwd_elemt(const T* dy, const T* x, const T* out, T* grad_x, T* grad_res, const BnGeometry& g,
                         bool vectorized, const float* mean, const float* coef_a, const float* coef_b,
                         const float* coef_c, bool relu, unsigned int blocks, cudaStream_t stream) {
  constexpr int VN = vec_elems<T>();
  const int64_t numel = g.M * g.C;
  const int64_t C = g.C, HW = g.HW;
  with_pack_and_layout<VN>(vectorized, g.nhwc, [&](auto pack, auto nhwc) {
    const auto kernel = &bn_bwd_elemt_kernel<T, decltype(pack)::value, decltype(nhwc)::value>;
    RF_LAUNCH(kernel, blocks, kElementwiseThreads, stream, dy, x, out, grad_x, grad_res, numel, C, HW, mean, coef_a,
        coef_b, coef_c, relu);
  });
}

#define RF_INSTANTIATE_BN(T)                                                                                        \
  template void launch_bn_stats_partials<T>(const T*, const BnGeometry&, int64_t, float*, float*, float*,          \
                                            cudaStream_t);                                                        \
  template void launch_bn_apply<T>(const T*, const T*, T*, const BnGeometry&, bool, const float*, const float*,    \
                                   const float*, const float*, bool, unsigned int, cudaStream_t);                  \
  template void launch_bn_bwd_reduce<T>(const T*, const T*, const T*, const float*, const BnGeometry&, int64_t,   \
                                        bool, float*, float*, cudaStream_t);                                       \
  template void launch_bn_bwd_elemt<T>(const T*, const T*, const T*, T*, T*, const BnGeometry&, bool, const float*, \
                                       const float*, const float*, const float*, bool, unsigned int, cudaStream_t);
RF_INSTANTIATE_FOR_DTYPES(RF_INSTANTIATE_BN)

}  // namespace resnet_fast
