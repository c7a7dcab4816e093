// Tensor-level host code of the resnet_fast CUDA kernels and their registration as torch operators
// (torch.ops.resnet_fast_cuda.*). Kernels and their launchers: add_relu.cu, batch_norm_act.cu (kernels.h).
//
// Schemas are the contract shared with the Python side (resnet_fast/backends/cuda_backend.py), which
// adds the fake (meta) implementations used by torch.compile and the autograd formulas. No op mutates
// its inputs: the running-statistics update is the library's (resnet_fast/ops/library.py), so the
// training forward is bn_stats then bn_act with the statistics it returned, and eval is bn_act alone.
//
// Light headers only (no ATen/cuda/CUDAContext.h, which pulls cusparse.h): ../shared/TOOLCHAIN.md.
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
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>

#include "kernels.h"

#ifdef RESNET_FAST_PYTHON_MODULE
// Built by setup.py as the Python extension module resnet_fast._C: an empty module whose import loads
// this library and runs the registrations below (no pybind11 needed). The CMake and JIT builds load
// the library with torch.ops.load_library instead and do not define this.
#include <Python.h>
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "resnet_fast CUDA kernels (torch.ops.resnet_fast_cuda)", -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif

namespace resnet_fast {
namespace {

// ---------------------------------------------------------------------------------------------
// dtype dispatch: float32, float16, bfloat16.
// Usage: RF_DISPATCH(t.scalar_type(), "op", [&] { launch<scalar_t>(...); });
#define RF_DISPATCH(TYPE, NAME, ...)                                                                       \
  [&] {                                                                                                    \
    switch (TYPE) {                                                                                        \
      case at::ScalarType::Float: {                                                                        \
        using scalar_t = float;                                                                            \
        return __VA_ARGS__();                                                                              \
      }                                                                                                    \
      case at::ScalarType::Half: {                                                                         \
        using scalar_t = c10::Half;                                                                        \
        return __VA_ARGS__();                                                                              \
      }                                                                                                    \
      case at::ScalarType::BFloat16: {                                                                     \
        using scalar_t = c10::BFloat16;                                                                    \
        return __VA_ARGS__();                                                                              \
      }                                                                                                    \
      default:                                                                                             \
        TORCH_CHECK(false, NAME, ": unsupported dtype ", TYPE, " (expected float32, float16 or bfloat16)"); \
    }                                                                                                      \
  }()

bool is_supported_dtype(at::ScalarType t) {
  return t == at::ScalarType::Float || t == at::ScalarType::Half || t == at::ScalarType::BFloat16;
}

bool is_aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// ---------------------------------------------------------------------------------------------
// Layouts. 4-D activations are processed either as NCHW or as NHWC (BnGeometry). A tensor already
// contiguous in one of them is used as is (NCHW wins when both hold, e.g. C == 1 or H*W == 1, where
// the two orders coincide); anything else is copied, to channels_last when its strides look
// channels-last (stride(1) < stride(3)), else to NCHW. The Python fake implementations
// (cuda_backend.pick_format) mirror this rule exactly.
at::MemoryFormat pick_format(const at::Tensor& x) {
  if (x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (x.dim() == 4 && x.stride(1) < x.stride(3)) return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

// `t` as a tensor contiguous in `fmt` (no copy if it already is).
at::Tensor in_format(const at::Tensor& t, at::MemoryFormat fmt) {
  return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
}

// `t` with the strides of `like` (a dense tensor of t's shape): t itself if it has them, else a copy.
at::Tensor like_strides(const at::Tensor& t, const at::Tensor& like) {
  return t.strides() == like.strides() ? t : at::empty_like(like).copy_(t);
}

// ---------------------------------------------------------------------------------------------
// Launch sizing.
int sm_count() {
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

// Blocks for a grid-stride loop over `work` items: enough to fill the GPU a few times over, never
// more than there is work.
unsigned int grid_for(int64_t work, int threads) {
  const int64_t needed = (work + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sm_count()) * 8;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(needed, cap)));
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

// ---------------------------------------------------------------------------------------------
// add_relu. The output is at::empty_like(x) for every input layout, which is what the op's fake
// implementation returns (resnet_fast/ops/library.py): x's strides when x is dense and
// non-overlapping, else its suggested memory format. x and y are brought to the output's strides
// (no copy when they already have them), so the three tensors share one dense layout and the kernel
// processes them as flat arrays.
at::Tensor add_relu_cuda(const at::Tensor& x, const at::Tensor& y) {
  check_cuda(x, "add_relu", "x");
  check_cuda(y, "add_relu", "y");
  TORCH_CHECK(x.device() == y.device(), "add_relu: x and y must be on the same device");
  TORCH_CHECK(x.sizes() == y.sizes(), "add_relu: x and y must have the same shape, got ", x.sizes(), " and ",
              y.sizes());
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "add_relu: x and y must have the same dtype");
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), "add_relu: unsupported dtype ", x.scalar_type());
  c10::cuda::CUDAGuard guard(x.device());

  at::Tensor out = at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const at::Tensor xc = like_strides(x, out);
  const at::Tensor yc = like_strides(y, out);

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  RF_DISPATCH(x.scalar_type(), "add_relu", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const scalar_t* yp = yc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool vec = is_aligned16(xp) && is_aligned16(yp) && is_aligned16(op);
    const int64_t work = vec ? numel / vec_elems<scalar_t>() + vec_elems<scalar_t>() : numel;
    launch_add_relu<scalar_t>(xp, yp, op, numel, vec, grid_for(work, kAddReluThreads), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// batch_norm_act.
BnGeometry geometry_of(const at::Tensor& x, at::MemoryFormat fmt) {
  BnGeometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.HW = x.size(2) * x.size(3);
  g.M = g.N * g.HW;
  g.nhwc = fmt == at::MemoryFormat::ChannelsLast;
  return g;
}

// P: partials per channel for the two-level reductions (grid (ceil(C/32), P) or (C, P)).
int64_t reduction_partials(const BnGeometry& g) {
  const int64_t target_blocks = static_cast<int64_t>(sm_count()) * 4;
  const int64_t rows_per_block = g.nhwc ? kReduceRows : kReduceThreads;
  const int64_t blocks_x = g.nhwc ? (g.C + kReduceCols - 1) / kReduceCols : g.C;
  const int64_t max_p =
      std::max<int64_t>(1, std::min<int64_t>((g.M + rows_per_block - 1) / rows_per_block, kMaxPartials));
  return std::min(max_p, std::max<int64_t>(1, (target_blocks + blocks_x - 1) / blocks_x));
}

// Whether 16-byte packs can be used for tensors of geometry g at these addresses: aligned, and packs
// never cross a channel (NHWC: C % N == 0; NCHW: HW % N == 0). numel % N == 0 follows.
template <typename T>
bool can_vectorize(const BnGeometry& g, std::initializer_list<const void*> ptrs) {
  constexpr int N = vec_elems<T>();
  for (const void* p : ptrs) {
    if (p != nullptr && !is_aligned16(p)) return false;
  }
  return g.nhwc ? (g.C % N == 0) : (g.HW % N == 0);
}

unsigned int elementwise_blocks(const BnGeometry& g, bool vectorized, int vec) {
  return grid_for(g.M * g.C / (vectorized ? vec : 1), kElementwiseThreads);
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

// Argument validation. Every op checks all of its arguments before it constructs its CUDAGuard or
// runs anything on a tensor (conversions, copies, launches): a refused call then only reads metadata
// (sizes, strides, devices, dtypes) and unwinds through nothing but the check itself.
bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A per-channel tensor: [C], on x's device (the kernels index it with x's channel).
void check_channel(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  const int64_t C = x.size(1);
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor of shape [", C, "], got an undefined tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape [", C, "], got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be a floating-point tensor, got ", t.scalar_type());
}

// An activation-shaped tensor (residual, grad_out, out): x's shape, dtype and device.
void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device ", x.device(), ", got ", t.device());
}

void check_input(const at::Tensor& x, const char* op) {
  check_cuda(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": x must be a 4-D [N, C, H, W] tensor, got ", x.dim(), "-D");
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op, ": unsupported dtype ", x.scalar_type(),
              " (expected float32, float16 or bfloat16)");
  TORCH_CHECK(x.size(1) <= 2147483647LL, op, ": too many channels");
}

// A checked per-channel tensor as a contiguous float32 [C] tensor, the form the kernels index.
at::Tensor channel_vector(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// An optional per-channel parameter (weight, bias) likewise; undefined if absent.
at::Tensor channel_param(const std::optional<at::Tensor>& t) { return present(t) ? channel_vector(*t) : at::Tensor(); }

// Batch mean and biased variance of xc (contiguous in the geometry's layout) into float32 [C] outputs.
void run_stats(const at::Tensor& xc, const BnGeometry& g, float* mean_out, float* var_out) {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t P = reduction_partials(g);
  at::Tensor ws = at::empty({3, P, g.C}, xc.options().dtype(at::kFloat));
  float* p_mean = ws.mutable_data_ptr<float>();
  float* p_m2 = p_mean + P * g.C;
  float* p_n = p_m2 + P * g.C;
  RF_DISPATCH(xc.scalar_type(), "bn_stats", [&] {
    launch_bn_stats_partials<scalar_t>(xc.const_data_ptr<scalar_t>(), g, P, p_mean, p_m2, p_n, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  launch_bn_stats_finalize(p_mean, p_m2, p_n, P, g.C, mean_out, var_out, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& x) {
  check_input(x, "bn_stats");
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 0, "bn_stats: x has no elements per channel");
  c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = pick_format(x);
  const at::Tensor xc = in_format(x, fmt);
  const BnGeometry g = geometry_of(xc, fmt);
  at::Tensor mean = at::empty({g.C}, x.options().dtype(at::kFloat));
  at::Tensor var = at::empty({g.C}, x.options().dtype(at::kFloat));
  if (g.C == 0) return {mean, var};
  run_stats(xc, g, mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>());
  return {mean, var};
}

// Normalisation with given statistics (the batch's from bn_stats when training, the running ones in
// eval). invstd is computed here, once per channel, rather than per element in the kernel.
at::Tensor bn_act_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var,
                       double eps, const std::optional<at::Tensor>& residual, bool relu) {
  check_input(x, "bn_act");
  check_channel(mean, x, "bn_act", "mean");
  check_channel(var, x, "bn_act", "var");
  if (present(weight)) check_channel(*weight, x, "bn_act", "weight");
  if (present(bias)) check_channel(*bias, x, "bn_act", "bias");
  if (present(residual)) check_like_x(*residual, x, "bn_act", "residual");

  c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = pick_format(x);
  const at::Tensor xc = in_format(x, fmt);
  const BnGeometry g = geometry_of(xc, fmt);
  const at::Tensor mean_f = channel_vector(mean);
  const at::Tensor invstd = channel_vector(var).add(eps).sqrt().reciprocal();
  const at::Tensor w = channel_param(weight);
  const at::Tensor b = channel_param(bias);
  const at::Tensor rc = present(residual) ? in_format(*residual, fmt) : at::Tensor();
  at::Tensor out = at::empty_like(xc);
  if (xc.numel() == 0) return out;

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  RF_DISPATCH(x.scalar_type(), "bn_act", [&] {
    using T = scalar_t;
    const T* xp = xc.const_data_ptr<T>();
    const T* rp = rc.defined() ? rc.const_data_ptr<T>() : nullptr;
    T* op = out.mutable_data_ptr<T>();
    const bool vec = can_vectorize<T>(g, {xp, rp, op});
    launch_bn_apply<T>(xp, rp, op, g, vec, mean_f.const_data_ptr<float>(), invstd.const_data_ptr<float>(),
                       ptr_or_null(w), ptr_or_null(b), relu, elementwise_blocks(g, vec, vec_elems<T>()), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& out, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training, bool relu, bool residual_grad) {
  check_input(x, "bn_act_backward");
  check_like_x(grad_out, x, "bn_act_backward", "grad_out");
  check_like_x(out, x, "bn_act_backward", "out");
  check_channel(save_mean, x, "bn_act_backward", "save_mean");
  check_channel(save_invstd, x, "bn_act_backward", "save_invstd");
  if (present(weight)) check_channel(*weight, x, "bn_act_backward", "weight");

  c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = pick_format(x);
  const at::Tensor xc = in_format(x, fmt);
  const at::Tensor dyc = in_format(grad_out, fmt);
  const at::Tensor outc = in_format(out, fmt);
  const BnGeometry g = geometry_of(xc, fmt);
  const at::Tensor mean = channel_vector(save_mean);
  const at::Tensor invstd = channel_vector(save_invstd);
  const at::Tensor w = channel_param(weight);

  const auto fopt = x.options().dtype(at::kFloat);
  at::Tensor grad_x = at::empty_like(xc);
  at::Tensor grad_res = residual_grad ? at::empty_like(xc) : at::empty({0}, x.options());
  at::Tensor grad_w = at::zeros({g.C}, fopt);
  at::Tensor grad_b = at::zeros({g.C}, fopt);
  if (xc.numel() == 0) return {grad_x, grad_w, grad_b, grad_res};

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t P = reduction_partials(g);
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
    const T* dyp = dyc.const_data_ptr<T>();
    const T* xp = xc.const_data_ptr<T>();
    const T* op = outc.const_data_ptr<T>();
    launch_bn_bwd_reduce<T>(dyp, xp, op, mp, g, P, relu, p_dy, p_dyx, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_bn_bwd_finalize(p_dy, p_dyx, P, g.C, g.M, training, invstd.const_data_ptr<float>(), ptr_or_null(w),
                           grad_w.mutable_data_ptr<float>(), grad_b.mutable_data_ptr<float>(), ca, cb, cc, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    T* gxp = grad_x.mutable_data_ptr<T>();
    T* grp = residual_grad ? grad_res.mutable_data_ptr<T>() : nullptr;
    const bool vec = can_vectorize<T>(g, {dyp, xp, op, gxp, grp});
    launch_bn_bwd_elemt<T>(dyp, xp, op, gxp, grp, g, vec, mp, ca, cb, cc, relu,
                           elementwise_blocks(g, vec, vec_elems<T>()), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_w, grad_b, grad_res};
}

}  // namespace
}  // namespace resnet_fast

TORCH_LIBRARY(resnet_fast_cuda, m) {
  m.def("add_relu(Tensor x, Tensor y) -> Tensor");
  m.def("bn_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def(
      "bn_act(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, float eps, Tensor? residual, "
      "bool relu) -> Tensor");
  m.def(
      "bn_act_backward(Tensor grad_out, Tensor x, Tensor out, Tensor? weight, Tensor save_mean, "
      "Tensor save_invstd, bool training, bool relu, bool residual_grad) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
}

TORCH_LIBRARY_IMPL(resnet_fast_cuda, CUDA, m) {
  m.impl("add_relu", &resnet_fast::add_relu_cuda);
  m.impl("bn_stats", &resnet_fast::bn_stats_cuda);
  m.impl("bn_act", &resnet_fast::bn_act_cuda);
  m.impl("bn_act_backward", &resnet_fast::bn_act_backward_cuda);
}
