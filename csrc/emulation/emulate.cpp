// The resnet_fast kernels compiled for the CPU emulation (cpu_emulation.h), with a C ABI for ctypes.
// Built and driven by tests/test_cuda_ext.py: it runs the real kernel code (indexing, vector packs,
// tails, Welford merges, block reductions with __syncthreads) on CPU tensors. dtype: 0 = float32,
// 1 = float16, 2 = bfloat16.
#define RESNET_FAST_CPU_EMULATION 1
#include "../add_relu.cu"
#include "../batch_norm_act.cu"

using resnet_fast::BnGeometry;

#define RF_EMU_DISPATCH(DT, ...)   \
  switch (DT) {                    \
    case 0: {                      \
      using T = float;             \
      __VA_ARGS__;                 \
      break;                       \
    }                              \
    case 1: {                      \
      using T = c10::Half;         \
      __VA_ARGS__;                 \
      break;                       \
    }                              \
    default: {                     \
      using T = c10::BFloat16;     \
      __VA_ARGS__;                 \
      break;                       \
    }                              \
  }

static BnGeometry geom(int64_t N, int64_t C, int64_t HW, int nhwc) {
  BnGeometry g;
  g.N = N;
  g.C = C;
  g.HW = HW;
  g.M = N * HW;
  g.nhwc = nhwc != 0;
  return g;
}

extern "C" {

void emu_add_relu(int dt, const void* x, const void* y, void* out, int64_t numel, int vectorized,
                  unsigned int blocks) {
  RF_EMU_DISPATCH(dt, resnet_fast::launch_add_relu<T>(static_cast<const T*>(x), static_cast<const T*>(y),
                                                      static_cast<T*>(out), numel, vectorized != 0, blocks, nullptr))
}

void emu_bn_stats_partials(int dt, const void* x, int64_t N, int64_t C, int64_t HW, int nhwc, int64_t P,
                           float* p_mean, float* p_m2, float* p_n) {
  const BnGeometry g = geom(N, C, HW, nhwc);
  RF_EMU_DISPATCH(dt, resnet_fast::launch_bn_stats_partials<T>(static_cast<const T*>(x), g, P, p_mean, p_m2, p_n,
                                                               nullptr))
}

void emu_bn_stats_finalize(const float* p_mean, const float* p_m2, const float* p_n, int64_t P, int64_t C, float* mean,
                           float* var) {
  resnet_fast::launch_bn_stats_finalize(p_mean, p_m2, p_n, P, C, mean, var, nullptr);
}

void emu_bn_apply(int dt, const void* x, const void* res, void* out, int64_t N, int64_t C, int64_t HW, int nhwc,
                  int vectorized, const float* mean, const float* invstd, const float* weight, const float* bias,
                  int relu, unsigned int blocks) {
  const BnGeometry g = geom(N, C, HW, nhwc);
  RF_EMU_DISPATCH(dt, resnet_fast::launch_bn_apply<T>(static_cast<const T*>(x), static_cast<const T*>(res),
                                                      static_cast<T*>(out), g, vectorized != 0, mean, invstd, weight,
                                                      bias, relu != 0, blocks, nullptr))
}

void emu_bn_bwd_reduce(int dt, const void* dy, const void* x, const void* out, const float* mean, int64_t N, int64_t C,
                       int64_t HW, int nhwc, int64_t P, int relu, float* p_sum_dy, float* p_sum_dy_xmu) {
  const BnGeometry g = geom(N, C, HW, nhwc);
  RF_EMU_DISPATCH(dt, resnet_fast::launch_bn_bwd_reduce<T>(static_cast<const T*>(dy), static_cast<const T*>(x),
                                                           static_cast<const T*>(out), mean, g, P, relu != 0,
                                                           p_sum_dy, p_sum_dy_xmu, nullptr))
}

void emu_bn_bwd_finalize(const float* p_sum_dy, const float* p_sum_dy_xmu, int64_t P, int64_t C, int64_t M,
                         int training, const float* invstd, const float* weight, float* grad_weight, float* grad_bias,
                         float* coef_a, float* coef_b, float* coef_c) {
  resnet_fast::launch_bn_bwd_finalize(p_sum_dy, p_sum_dy_xmu, P, C, M, training != 0, invstd, weight, grad_weight,
                                      grad_bias, coef_a, coef_b, coef_c, nullptr);
}

void emu_bn_bwd_elemt(int dt, const void* dy, const void* x, const void* out, void* grad_x, void* grad_res, int64_t N,
                      int64_t C, int64_t HW, int nhwc, int vectorized, const float* mean, const float* coef_a,
                      const float* coef_b, const float* coef_c, int relu, unsigned int blocks) {
  const BnGeometry g = geom(N, C, HW, nhwc);
  RF_EMU_DISPATCH(dt, resnet_fast::launch_bn_bwd_elemt<T>(static_cast<const T*>(dy), static_cast<const T*>(x),
                                                          static_cast<const T*>(out), static_cast<T*>(grad_x),
                                                          static_cast<T*>(grad_res), g, vectorized != 0, mean, coef_a,
                                                          coef_b, coef_c, relu != 0, blocks, nullptr))
}

}  // extern "C"
